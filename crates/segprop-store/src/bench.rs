//! Store I/O throughput beside raw baselines (run by `examples/store_io.rs`).
//!
//! In one run, on the same bytes (`total_bytes` in blobs of `blob_bytes`, `reps` times, medians):
//!
//! - **gRPC**: `SnapshotService` Put and Get on loopback (a [`Store::grpc`] client against
//!   [`service`] over an in-memory store) against a plain tokio TCP server and client moving the
//!   same blobs with a length prefix. Measured with tonic's default HTTP/2 windows and with the
//!   8 MiB stream windows the coordinator and workers use.
//! - **Local filesystem**: [`Store::local`] put and get against `std::fs` `write_all` into a new
//!   file and `read` back (neither side fsyncs; both read from the page cache).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};

use crate::Store;
use crate::grpc::service;

/// What to move, and how often.
#[derive(Debug, Clone)]
pub struct StoreIoOptions {
    /// Scratch directory for the filesystem measurements (emptied before each rep).
    pub dir: PathBuf,
    pub total_bytes: usize,
    pub blob_bytes: usize,
    pub reps: usize,
}

impl StoreIoOptions {
    /// 64 MiB in 4 MiB blobs, 5 reps.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            total_bytes: 64 << 20,
            blob_bytes: 4 << 20,
            reps: 5,
        }
    }
}

/// Median throughputs of one path (MB/s, 10^6 bytes per second).
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub name: String,
    pub store_mb_s: f64,
    pub baseline_mb_s: f64,
    /// Median over reps of store / baseline.
    pub ratio: f64,
}

#[derive(Debug, Clone)]
pub struct StoreIoReport {
    pub options: StoreIoOptions,
    pub rows: Vec<Measurement>,
}

impl StoreIoReport {
    /// A small text table.
    pub fn table(&self) -> String {
        let o = &self.options;
        let mut out = format!(
            "store-io: {} MiB in {} blobs of {} MiB, {} reps, medians (MB/s = 10^6 B/s)\n",
            o.total_bytes >> 20,
            o.total_bytes / o.blob_bytes.max(1),
            o.blob_bytes >> 20,
            o.reps
        );
        out.push_str(&format!(
            "{:<34} {:>11} {:>14} {:>9}\n",
            "path", "store MB/s", "baseline MB/s", "ratio"
        ));
        for r in &self.rows {
            out.push_str(&format!(
                "{:<34} {:>11.0} {:>14.0} {:>9.2}\n",
                r.name, r.store_mb_s, r.baseline_mb_s, r.ratio
            ));
        }
        out
    }
}

/// A failed benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Store(#[from] crate::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("grpc transport: {source}")]
    Transport {
        #[from]
        source: tonic::transport::Error,
    },
    #[error("blob {index} came back different")]
    Mismatch { index: usize },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Io { what, source }
}

/// Runs every measurement.
pub async fn store_io(options: &StoreIoOptions) -> Result<StoreIoReport, BenchError> {
    let count = (options.total_bytes / options.blob_bytes.max(1)).max(1);
    let blobs: Vec<Bytes> = (0..count)
        .map(|i| pseudo_random(options.blob_bytes, i as u64))
        .collect();
    let mut rows = Vec::new();
    for large_windows in [false, true] {
        let label = if large_windows {
            "8 MiB stream windows"
        } else {
            "tonic defaults"
        };
        let (put, get) = grpc_vs_tcp(&blobs, options.reps, large_windows).await?;
        rows.push(put.named(format!("grpc put vs tcp ({label})")));
        rows.push(get.named(format!("grpc get vs tcp ({label})")));
    }
    let (put, get) = local_vs_std(&options.dir, &blobs, options.reps).await?;
    rows.push(put.named("local put vs std::fs write".into()));
    rows.push(get.named("local get vs std::fs read".into()));
    Ok(StoreIoReport {
        options: options.clone(),
        rows,
    })
}

/// Deterministic incompressible bytes (xorshift64*).
fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

/// Per-rep timings of the store and its baseline over the same bytes.
#[derive(Default)]
struct Samples {
    bytes: u64,
    store: Vec<Duration>,
    baseline: Vec<Duration>,
}

impl Samples {
    fn named(self, name: String) -> Measurement {
        let mb_s = |d: &Duration| self.bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9);
        let store: Vec<f64> = self.store.iter().map(mb_s).collect();
        let baseline: Vec<f64> = self.baseline.iter().map(mb_s).collect();
        let ratios: Vec<f64> = store.iter().zip(&baseline).map(|(s, b)| s / b).collect();
        Measurement {
            name,
            store_mb_s: median(store),
            baseline_mb_s: median(baseline),
            ratio: median(ratios),
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

async fn grpc_vs_tcp(
    blobs: &[Bytes],
    reps: usize,
    large_windows: bool,
) -> Result<(Samples, Samples), BenchError> {
    let stream_window = large_windows.then_some(crate::grpc::STREAM_WINDOW_BYTES);
    let connection_window = large_windows.then_some(crate::grpc::CONNECTION_WINDOW_BYTES);
    let bytes = blobs.iter().map(|b| b.len() as u64).sum();
    let (mut put, mut get) = (
        Samples {
            bytes,
            ..Samples::default()
        },
        Samples {
            bytes,
            ..Samples::default()
        },
    );

    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("bind grpc"))?;
    let addr = listener.local_addr().map_err(io("grpc address"))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .initial_stream_window_size(stream_window)
            .initial_connection_window_size(connection_window)
            .add_service(service(Store::memory(), None))
            .serve_with_incoming_shutdown(
                // As the coordinator serves: Nagle off (serve_with_incoming ignores the builder's
                // tcp_nodelay, and Nagle with delayed ACKs stalls HTTP/2 window updates).
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(stream_window)
        .initial_connection_window_size(connection_window)
        .connect()
        .await?;
    let client = Store::grpc(channel, None)?;

    let (tcp_addr, tcp_server) = start_tcp_server().await?;
    let mut tcp = TcpStream::connect(tcp_addr)
        .await
        .map_err(io("connect tcp"))?;
    tcp.set_nodelay(true).map_err(io("nodelay"))?;

    for _ in 0..reps {
        let start = Instant::now();
        for (i, blob) in blobs.iter().enumerate() {
            client
                .put(&format!("bench/blob-{i:03}"), blob.clone())
                .await?;
        }
        put.store.push(start.elapsed());

        let start = Instant::now();
        for blob in blobs {
            tcp_put(&mut tcp, blob).await?;
        }
        put.baseline.push(start.elapsed());

        let start = Instant::now();
        for (i, blob) in blobs.iter().enumerate() {
            let got = client.get(&format!("bench/blob-{i:03}")).await?;
            if got.len() != blob.len() {
                return Err(BenchError::Mismatch { index: i });
            }
        }
        get.store.push(start.elapsed());

        let start = Instant::now();
        for (i, blob) in blobs.iter().enumerate() {
            if tcp_get(&mut tcp, blob.len()).await? != blob.len() {
                return Err(BenchError::Mismatch { index: i });
            }
        }
        get.baseline.push(start.elapsed());
    }
    drop(tcp);
    let _ = stop.send(());
    let _ = server.await;
    tcp_server.abort();
    Ok((put, get))
}

/// The raw baseline: `P <u64 len> <bytes>` is answered with one byte once all bytes are in a
/// buffer; `G <u64 len>` with `len` bytes.
async fn start_tcp_server()
-> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("bind tcp"))?;
    let addr = listener.local_addr().map_err(io("tcp address"))?;
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = conn.set_nodelay(true);
                let mut last = Bytes::new();
                loop {
                    let mut head = [0u8; 9];
                    if conn.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let mut len = [0u8; 8];
                    len.copy_from_slice(&head[1..]);
                    let len = usize::try_from(u64::from_le_bytes(len)).unwrap_or(0);
                    let ok = if head[0] == b'P' {
                        let mut buf = vec![0u8; len];
                        let read = conn.read_exact(&mut buf).await.is_ok();
                        last = buf.into();
                        read && conn.write_all(&[1]).await.is_ok()
                    } else {
                        let out = if last.len() >= len {
                            last.slice(..len)
                        } else {
                            Bytes::from(vec![0u8; len])
                        };
                        conn.write_all(&out).await.is_ok()
                    };
                    if !ok {
                        return;
                    }
                }
            });
        }
    });
    Ok((addr, task))
}

async fn tcp_put(tcp: &mut TcpStream, blob: &Bytes) -> Result<(), BenchError> {
    let mut head = [0u8; 9];
    head[0] = b'P';
    head[1..].copy_from_slice(&(blob.len() as u64).to_le_bytes());
    tcp.write_all(&head).await.map_err(io("tcp put"))?;
    tcp.write_all(blob).await.map_err(io("tcp put"))?;
    let mut ack = [0u8; 1];
    tcp.read_exact(&mut ack).await.map_err(io("tcp put ack"))?;
    Ok(())
}

async fn tcp_get(tcp: &mut TcpStream, len: usize) -> Result<usize, BenchError> {
    let mut head = [0u8; 9];
    head[0] = b'G';
    head[1..].copy_from_slice(&(len as u64).to_le_bytes());
    tcp.write_all(&head).await.map_err(io("tcp get"))?;
    let mut buf = vec![0u8; len];
    tcp.read_exact(&mut buf).await.map_err(io("tcp get"))?;
    Ok(buf.len())
}

async fn local_vs_std(
    dir: &Path,
    blobs: &[Bytes],
    reps: usize,
) -> Result<(Samples, Samples), BenchError> {
    let bytes = blobs.iter().map(|b| b.len() as u64).sum();
    let (mut put, mut get) = (
        Samples {
            bytes,
            ..Samples::default()
        },
        Samples {
            bytes,
            ..Samples::default()
        },
    );
    let (store_dir, raw_dir) = (dir.join("store"), dir.join("raw"));
    for _ in 0..reps {
        for d in [&store_dir, &raw_dir] {
            if d.exists() {
                std::fs::remove_dir_all(d).map_err(io("empty scratch dir"))?;
            }
            std::fs::create_dir_all(d).map_err(io("create scratch dir"))?;
        }
        let store = Store::local(&store_dir)?;

        let start = Instant::now();
        for (i, blob) in blobs.iter().enumerate() {
            store
                .put(&format!("bench/blob-{i:03}"), blob.clone())
                .await?;
        }
        put.store.push(start.elapsed());

        let raw = raw_dir.clone();
        let owned = blobs.to_vec();
        let elapsed = tokio::task::spawn_blocking(move || -> std::io::Result<Duration> {
            use std::io::Write;
            let start = Instant::now();
            for (i, blob) in owned.iter().enumerate() {
                let mut file = std::fs::File::create(raw.join(format!("blob-{i:03}")))?;
                file.write_all(blob)?;
            }
            Ok(start.elapsed())
        })
        .await
        .map_err(|e| BenchError::Io {
            what: "std::fs write",
            source: std::io::Error::other(e),
        })?
        .map_err(io("std::fs write"))?;
        put.baseline.push(elapsed);

        let start = Instant::now();
        for (i, blob) in blobs.iter().enumerate() {
            if store.get(&format!("bench/blob-{i:03}")).await?.len() != blob.len() {
                return Err(BenchError::Mismatch { index: i });
            }
        }
        get.store.push(start.elapsed());

        let raw = raw_dir.clone();
        let count = blobs.len();
        let elapsed = tokio::task::spawn_blocking(move || -> std::io::Result<Duration> {
            let start = Instant::now();
            for i in 0..count {
                std::fs::read(raw.join(format!("blob-{i:03}")))?;
            }
            Ok(start.elapsed())
        })
        .await
        .map_err(|e| BenchError::Io {
            what: "std::fs read",
            source: std::io::Error::other(e),
        })?
        .map_err(io("std::fs read"))?;
        get.baseline.push(elapsed);
    }
    for d in [&store_dir, &raw_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok((put, get))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tiny_run_produces_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreIoOptions {
            dir: dir.path().to_path_buf(),
            total_bytes: 2 << 20,
            blob_bytes: 1 << 20,
            reps: 1,
        };
        let report = store_io(&options).await.unwrap();
        assert_eq!(report.rows.len(), 6);
        assert!(
            report
                .rows
                .iter()
                .all(|r| r.store_mb_s > 0.0 && r.ratio > 0.0)
        );
        assert!(report.table().contains("local get vs std::fs read"));
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(pseudo_random(10, 1).len(), 10);
        assert_ne!(pseudo_random(64, 1), pseudo_random(64, 2));
    }
}
