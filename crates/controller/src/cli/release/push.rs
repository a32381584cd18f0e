use std::io::IsTerminal;
use std::path::PathBuf;

use convoy_proto::v1 as pb;
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::ReceiverStream;

#[derive(clap::Args, Debug)]
pub struct Args {
    file: PathBuf,
}

pub async fn run(config: &crate::cli::Globals, a: Args) -> anyhow::Result<()> {
    // Check the file locally first: a typo should not cost an upload.
    let mut f =
        tokio::fs::File::open(&a.file).await.map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
    let total = f.metadata().await?.len();
    {
        let mut std_file = std::fs::File::open(&a.file)?;
        convoy_bundle::read_header(&mut std_file, 64 << 20)?.manifest()?;
    }
    let config = config.load_config()?;
    let mut client = crate::client::admin_client(&config).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let progress = std::io::stderr().is_terminal();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; crate::logic::BUNDLE_CHUNK];
        let mut sent = 0u64;
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            sent += n as u64;
            if tx.send(pb::PushChunk { data: buf[..n].to_vec() }).await.is_err() {
                break;
            }
            if progress {
                let pct = (sent * 100).checked_div(total).unwrap_or(100);
                let bar = "#".repeat((pct / 4) as usize);
                eprint!("\rpushing [{bar:<25}] {pct:>3}% {}", super::human_bytes(sent));
            }
        }
        if progress {
            eprintln!();
        }
        Ok::<_, std::io::Error>(())
    });
    let resp =
        client.push_release(ReceiverStream::new(rx)).await.map_err(crate::cli::status_error)?.into_inner();
    reader.await??;
    let r = resp.release.ok_or_else(|| anyhow::anyhow!("controller sent no release"))?;
    if resp.already_present {
        println!("{}@{} already present (sha256 {})", r.app, r.version, r.digest);
    } else {
        println!("pushed {}@{} (sha256 {}, {})", r.app, r.version, r.digest, super::human_bytes(r.size));
    }
    Ok(())
}
