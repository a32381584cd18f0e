use std::path::PathBuf;

use convoy_bundle::SecretKey;

#[derive(clap::Args, Debug)]
pub struct Args {
    file: PathBuf,
    #[arg(long)]
    key: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let key = SecretKey::load(&a.key)?;
    convoy_bundle::add_signature(&a.file, &key)?;
    println!("signed {} with {}", a.file.display(), key.public().id());
    Ok(())
}
