use std::path::PathBuf;

use convoy_base::files;
use convoy_bundle::SecretKey;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Write NAME.key (ed25519, mode 0600) and NAME.pub. Refuses to overwrite either.
    Generate {
        /// Output path prefix.
        #[arg(short = 'o', long = "output")]
        name: PathBuf,
    },
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    let Command::Generate { name } = cmd;
    let key_path = name.with_extension("key");
    let pub_path = name.with_extension("pub");
    for p in [&key_path, &pub_path] {
        if p.exists() {
            anyhow::bail!("refusing to overwrite {}", p.display());
        }
    }
    let key = SecretKey::generate();
    files::write_new(&key_path, key.to_text().as_bytes(), true)?;
    files::write_new(&pub_path, key.public().to_text().as_bytes(), false)?;
    println!("{}", key.public().id());
    eprintln!("wrote {} (keep it secret) and {}", key_path.display(), pub_path.display());
    Ok(())
}
