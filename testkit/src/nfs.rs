//! A real NFS client for data checks: the `nfs-rs` crate (NFSv4.1 over TCP), run from inside a
//! test host's network namespace so export rules see that host's address.
//!
//! Debian's libnfs `nfs-cp` cannot write 4 KiB or more over NFSv4, so every check that writes
//! data goes through here; `nfs-cat` stays for quick access checks. Each call runs on a thread
//! of its own that enters the namespace (`setns` affects only the calling thread) with a
//! single-threaded runtime, and is bounded by [`NFS_DEADLINE`].
//!
//! ```ignore
//! let nfs = NfsClient::in_netns(&host.ns);
//! nfs.write("10.0.0.11", 2049, "/media", "data.bin", &bytes)?;
//! assert_eq!(nfs.read("10.0.0.11", 2049, "/media", "data.bin")?, bytes);
//! ```

use std::os::fd::AsFd;
use std::time::Duration;

use bytes::Bytes;
use nfs_rs::{Mount, OPEN_READ, OPEN_WRITE};

/// The most any one NFS call here may take.
pub const NFS_DEADLINE: Duration = Duration::from_secs(60);
/// Bytes per READ request (below the session's negotiated maximum reply size).
const READ_CHUNK: u32 = 256 << 10;

/// Where the client runs: a network namespace (`/run/netns/NAME`), or the test's own.
#[derive(Clone, Debug)]
pub struct NfsClient {
    netns: Option<String>,
}

impl NfsClient {
    pub fn in_netns(name: &str) -> NfsClient {
        NfsClient {
            netns: Some(name.to_string()),
        }
    }

    /// Creates (or truncates) `file` in the export `export` on `server:port` with `data`,
    /// committed to stable storage before it returns.
    pub fn write(
        &self,
        server: &str,
        port: u16,
        export: &str,
        file: &str,
        data: &[u8],
    ) -> Result<(), String> {
        let (file, data) = (file.to_string(), Bytes::copy_from_slice(data));
        self.with_mount(server, port, export, move |m| {
            Box::pin(async move {
                let created = m.create_path(&file, Some(0o644)).await.map_err(err)?;
                let result = nfs_rs::write_all(m, created.fh.clone(), 0, data).await;
                let _ = m.close(created.fh).await;
                result.map(|_| ()).map_err(err)
            })
        })
    }

    /// Appends `data` to `file` (created if missing) and returns the offset it was written at,
    /// committed to stable storage before it returns.
    pub fn append(
        &self,
        server: &str,
        port: u16,
        export: &str,
        file: &str,
        data: &[u8],
    ) -> Result<u64, String> {
        let (file, data) = (file.to_string(), Bytes::copy_from_slice(data));
        self.with_mount(server, port, export, move |m| {
            Box::pin(async move {
                let (fh, offset) = match m.getattr_path(&file).await {
                    Ok(attr) => (
                        m.open_path(&file, OPEN_WRITE).await.map_err(err)?.fh,
                        attr.filesize,
                    ),
                    Err(_) => (m.create_path(&file, Some(0o644)).await.map_err(err)?.fh, 0),
                };
                let result = nfs_rs::write_all(m, fh.clone(), offset, data).await;
                let _ = m.close(fh).await;
                result.map(|_| offset).map_err(err)
            })
        })
    }

    /// The whole content of `file`.
    pub fn read(
        &self,
        server: &str,
        port: u16,
        export: &str,
        file: &str,
    ) -> Result<Vec<u8>, String> {
        let file = file.to_string();
        self.with_mount(server, port, export, move |m| {
            Box::pin(async move {
                let size = m.getattr_path(&file).await.map_err(err)?.filesize;
                let opened = m.open_path(&file, OPEN_READ).await.map_err(err)?;
                let mut out = Vec::with_capacity(size as usize);
                let mut result = Ok(());
                while (out.len() as u64) < size {
                    let want = READ_CHUNK.min((size - out.len() as u64) as u32);
                    match m.read(opened.fh.clone(), out.len() as u64, want).await {
                        Ok(chunk) if chunk.is_empty() => break,
                        Ok(chunk) => out.extend_from_slice(&chunk),
                        Err(e) => {
                            result = Err(err(e));
                            break;
                        }
                    }
                }
                let _ = m.close(opened.fh).await;
                result.map(|()| out)
            })
        })
    }

    fn with_mount<T: Send + 'static>(
        &self,
        server: &str,
        port: u16,
        export: &str,
        op: impl for<'m> FnOnce(
                &'m dyn Mount,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T, String>> + 'm>,
            > + Send
            + 'static,
    ) -> Result<T, String> {
        let url = format!("nfs://{server}{export}?version=4.1&nfsport={port}&uid=0&gid=0");
        let netns = self.netns.clone();
        let worker = std::thread::spawn(move || -> Result<T, String> {
            if let Some(ns) = netns {
                let f = std::fs::File::open(format!("/run/netns/{ns}"))
                    .map_err(|e| format!("network namespace {ns}: {e}"))?;
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("entering network namespace {ns}: {e}"))?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let work = async {
                    let mount = nfs_rs::parse_url_and_mount(&url)
                        .await
                        .map_err(|e| format!("mounting {url}: {e}"))?;
                    let result = op(mount.as_ref()).await;
                    let _ = mount.umount().await;
                    result
                };
                tokio::time::timeout(NFS_DEADLINE, work)
                    .await
                    .unwrap_or_else(|_| Err(format!("{url}: no answer within {NFS_DEADLINE:?}")))
            })
        });
        worker
            .join()
            .unwrap_or_else(|_| Err("the NFS client thread panicked".into()))
    }
}

fn err(e: nfs_rs::NfsError) -> String {
    e.to_string()
}

/// `len` bytes of reproducible, incompressible data (xorshift from `seed`).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
