use std::path::PathBuf;

use crate::init::{init, InitOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to write the PKI and config.
    #[arg(long, default_value = "certs")]
    data_dir: PathBuf,
    /// The SPIFFE trust domain of every identity.
    #[arg(long, default_value = "convoy.local")]
    trust_domain: String,
    /// A DNS name or IP address for the controller's certificate; repeatable.
    #[arg(long = "san", default_values = ["localhost", "127.0.0.1"])]
    sans: Vec<String>,
    /// The first admin's name.
    #[arg(long, default_value = "admin")]
    admin: String,
    /// Where admins reach the controller, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:7443")]
    controller: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = InitOptions {
        data_dir: args.data_dir,
        trust_domain: args.trust_domain,
        sans: args.sans,
        admin: args.admin,
        controller: args.controller,
        ..InitOptions::default()
    };
    let config = init(&opts)?;
    println!("{}", config.display());
    eprintln!(
        "created the CA, the controller certificate and admin {:?}; next: convoy serve --config {}",
        opts.admin,
        config.display()
    );
    Ok(())
}
