//! Store I/O throughput beside raw baselines (see `segprop_store::bench`):
//!
//! ```text
//! cargo run --release -p segprop-store --example store_io -- [--total-mib 64] [--blob-mib 4] [--reps 5] [--dir DIR]
//! ```

use anyhow::{Context, bail};
use segprop_store::bench::{StoreIoOptions, store_io};

fn main() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let mut options = StoreIoOptions::new(scratch.path().to_path_buf());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .with_context(|| format!("{flag} {value}"))
        };
        match flag.as_str() {
            "--total-mib" => options.total_bytes = number()? << 20,
            "--blob-mib" => options.blob_bytes = number()? << 20,
            "--reps" => options.reps = number()?,
            "--dir" => options.dir = value.into(),
            other => bail!("unknown flag {other} (--total-mib, --blob-mib, --reps, --dir)"),
        }
    }
    if options.blob_bytes == 0 || options.total_bytes < options.blob_bytes || options.reps == 0 {
        bail!("need blob-mib > 0, total-mib >= blob-mib and reps > 0");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(store_io(&options))?;
    print!("{}", report.table());
    Ok(())
}
