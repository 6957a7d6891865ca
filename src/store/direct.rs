//! Direct writes (`O_DIRECT`): whole aligned blocks go from this buffer to the disk
//! without passing through the page cache.
//!
//! A cold fill writes every byte once and, most of the time, nobody reads it back before
//! it is committed. Through the page cache, ext4 spends more CPU per byte on that write
//! (page allocation, delayed allocation, buffer heads, then writeback and the fsync) than
//! the copy itself; on a 2-core node that was a quarter of a cold pull's CPU. A direct
//! write costs one copy into this buffer. Filesystems that refuse `O_DIRECT` (tmpfs on
//! older kernels, some FUSE and network filesystems) keep the buffered path.

use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The alignment (and size granularity) direct I/O needs on every Linux filesystem.
const PAGE: usize = 4096;

/// Bytes gathered before one direct write.
pub const BLOCK: usize = 512 * 1024;

#[repr(C, align(4096))]
struct Page([u8; PAGE]);

/// An `O_DIRECT` descriptor of a file and the aligned bytes waiting for a whole block.
pub struct Direct {
    file: File,
    pages: Vec<Page>,
    len: usize,
}

impl Direct {
    /// Opens `path` (already created) for direct writes; `None` when the filesystem does
    /// not support them.
    pub fn open(path: &Path) -> Option<Direct> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        Some(Direct {
            file,
            pages: Vec::new(),
            len: 0,
        })
    }

    /// Copies as much of `bytes` as fits into the block; returns how much it took. Pages
    /// are added as bytes reach them (a manifest of a few KiB does not zero 512 KiB),
    /// then kept for the next block.
    pub fn fill(&mut self, bytes: &[u8]) -> usize {
        let mut took = 0;
        while took < bytes.len() && self.len < BLOCK {
            let (page, at) = (self.len / PAGE, self.len % PAGE);
            if page == self.pages.len() {
                self.pages.push(Page([0; PAGE]));
            }
            let n = (PAGE - at).min(bytes.len() - took);
            self.pages[page].0[at..at + n].copy_from_slice(&bytes[took..took + n]);
            took += n;
            self.len += n;
        }
        took
    }

    pub fn full(&self) -> bool {
        self.len == BLOCK
    }

    /// Writes the full block at the descriptor's position (always the end of what was
    /// written through it). `EINVAL` means the filesystem takes the open but not the write.
    pub fn write_block(&mut self) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = self.pages.iter().map(|p| IoSlice::new(&p.0)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.file.write_vectored(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                // A short direct write of whole pages leaves the rest aligned.
                Ok(n) if n % PAGE == 0 => IoSlice::advance_slices(&mut rest, n),
                Ok(_) => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.len = 0;
        Ok(())
    }

    /// The bytes waiting for a whole block (written through the page cache at the end).
    pub fn pending(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        let mut left = self.len;
        for p in &self.pages {
            let n = left.min(PAGE);
            out.extend_from_slice(&p.0[..n]);
            left -= n;
            if left == 0 {
                break;
            }
        }
        out
    }

    pub fn pending_len(&self) -> usize {
        self.len
    }
}
