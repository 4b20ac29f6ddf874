//! `--pid-file`: the running proxy's process ID, for `reload --pid-file` and `upgrade
//! --pid-file` (and init systems that want one).
//!
//! Written once the listeners are bound; after an upgrade the successor writes its own ID.
//! Removed at exit only while it still holds this process's ID, so an old process leaving
//! after an upgrade does not remove its successor's file.

use std::path::{Path, PathBuf};

/// Why a PID file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    /// Reading or writing the file failed.
    #[error("pid file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file does not hold a process ID.
    #[error("pid file {path}: no process ID in it ({content:?})")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The beginning of what it holds.
        content: String,
    },
}

/// A written PID file, removed on drop if it still names this process.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    /// Writes this process's ID to `path` (through a temporary file and a rename, so a reader
    /// never sees half a number).
    ///
    /// # Errors
    /// [`PidFileError::Io`].
    pub fn write(path: &Path) -> Result<PidFile, PidFileError> {
        let pid = std::process::id();
        let io = |source| PidFileError::Io {
            path: path.to_owned(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{pid}.tmp"));
        std::fs::write(&tmp, format!("{pid}\n")).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })?;
        Ok(PidFile {
            path: path.to_owned(),
            pid,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if read(&self.path).ok() == Some(self.pid) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads the process ID in `path`.
///
/// # Errors
/// [`PidFileError`] when the file cannot be read or holds no positive number.
pub fn read(path: &Path) -> Result<u32, PidFileError> {
    let text = std::fs::read(path).map_err(|source| PidFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&text[..text.len().min(64)]).into_owned();
    match text.trim().parse::<u32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(PidFileError::Invalid {
            path: path.to_owned(),
            content: text.chars().take(20).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_read_and_removed_only_while_ours() {
        let dir = std::env::temp_dir().join(format!("wazuh-proxy-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.pid");
        let f = PidFile::write(&path).unwrap();
        assert_eq!(read(&path).unwrap(), std::process::id());
        drop(f);
        assert!(!path.exists());
        let f = PidFile::write(&path).unwrap();
        std::fs::write(&path, "4242\n").unwrap(); // a successor's
        drop(f);
        assert_eq!(read(&path).unwrap(), 4242);
        std::fs::write(&path, "nope").unwrap();
        assert!(matches!(read(&path), Err(PidFileError::Invalid { .. })));
        std::fs::write(&path, "0").unwrap();
        assert!(read(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
