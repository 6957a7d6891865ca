//! One `serve` per store directory: the store assumes a single owner (its `tmp/` is
//! emptied at start, fills and uploads write there), so a second server on the same
//! directory is refused at start, naming the process that holds it.
//!
//! The lock is `flock(2)` on `<storage>/serve.lock`: the kernel drops it when the process
//! ends however it ends (kill -9 included), so a stale file never blocks a restart. CLI
//! commands (`verify`, `gc`, `import`, ...) do not take it: they may run beside a server.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{Store, StoreError};

/// Held by `serve` for its lifetime; dropping it (or the process ending) releases the store.
#[derive(Debug)]
pub struct Owner {
    _file: File,
}

impl Store {
    /// Takes the store for this process, or says who holds it.
    pub fn own(&self) -> Result<Owner, StoreError> {
        own(self.root())
    }
}

fn own(root: &Path) -> Result<Owner, StoreError> {
    let path = root.join("serve.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e.into());
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(StoreError::Owned {
            path: root.to_path_buf(),
            holder: holder.trim().to_string(),
        });
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "pid {}", std::process::id())?;
    Ok(Owner { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lock is per open file description, so a second `own` in the same process
    /// behaves as another process's would.
    #[test]
    fn a_second_owner_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::TempDir::new().expect("tmp");
        let first = own(dir.path()).expect("first");
        let err = own(dir.path()).expect_err("second");
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        drop(first);
        own(dir.path()).expect("free again");
    }
}
