//! The uids whose data this machine has **published**: written to etcd as served here
//! (`status.machine`), so clients may have written to it. Kept in `<stateDir>/published`, one
//! uid per line, recorded *before* the status write that publishes (a crash in between leaves
//! the uid recorded: the safe side).
//!
//! It is the local evidence behind destroying a stale copy ([`crate::plan::stale_here`]): etcd
//! saying "served elsewhere" is not enough on its own — etcd restored from an old backup says
//! that of a volume moved *here* since. A copy whose uid is listed here is never destroyed as
//! stale; it is kept and reported. A missing file (the first start of an agent that did not
//! keep one, or a lost state directory) is seeded with every uid already on the pool: all of
//! them count as published.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct Published {
    path: PathBuf,
    uids: Mutex<BTreeSet<String>>,
}

impl Published {
    /// Reads `<state_dir>/published`; without one, writes it from `on_disk` (the uids on the
    /// pool now).
    pub fn open(
        state_dir: &Path,
        on_disk: impl FnOnce() -> std::io::Result<Vec<String>>,
    ) -> std::io::Result<Self> {
        let path = state_dir.join("published");
        let uids = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let uids: BTreeSet<String> = on_disk()?.into_iter().collect();
                write_all(&path, &uids)?;
                uids
            }
            Err(e) => return Err(e),
        };
        Ok(Published {
            path,
            uids: Mutex::new(uids),
        })
    }

    pub fn contains(&self, uid: &str) -> bool {
        self.lock().contains(uid)
    }

    /// Records `uid` as published (durably, before returning); cheap when it already is.
    pub fn record(&self, uid: &str) -> std::io::Result<()> {
        let mut uids = self.lock();
        if uids.contains(uid) {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        writeln!(f, "{uid}")?;
        f.sync_all()?;
        uids.insert(uid.to_string());
        Ok(())
    }

    /// Forgets `uid` once its data here is destroyed (keeps the file as small as the pool).
    pub fn forget(&self, uid: &str) -> std::io::Result<()> {
        let mut uids = self.lock();
        if !uids.contains(uid) {
            return Ok(());
        }
        let mut rest = uids.clone();
        rest.remove(uid);
        write_all(&self.path, &rest)?;
        *uids = rest;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.uids.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Replaces the file atomically: a crash leaves the old list or the new one.
fn write_all(path: &Path, uids: &BTreeSet<String>) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    for uid in uids {
        writeln!(f, "{uid}")?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_start_counts_everything_on_the_pool_as_published_and_the_list_persists() {
        let dir = tempfile::tempdir().unwrap();
        let p = Published::open(dir.path(), || Ok(vec!["a".into(), "b".into()])).unwrap();
        assert!(p.contains("a") && p.contains("b") && !p.contains("c"));
        p.record("c").unwrap();
        p.record("c").unwrap();
        p.forget("a").unwrap();
        // Reopened: the file wins, the pool is not consulted again.
        let again = Published::open(dir.path(), || panic!("only without a file")).unwrap();
        assert!(!again.contains("a") && again.contains("b") && again.contains("c"));
        let text = std::fs::read_to_string(dir.path().join("published")).unwrap();
        assert_eq!(text.lines().filter(|l| *l == "c").count(), 1);
    }

    #[test]
    fn an_unreadable_list_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("published")).unwrap();
        assert!(Published::open(dir.path(), || Ok(Vec::new())).is_err());
    }
}
