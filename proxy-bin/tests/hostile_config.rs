//! Oversized and malformed configuration files: each is refused with a clear error, without
//! being read whole and without a panic, by the library readers and by `check-config`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wazuh_proxy::config::{Config, MAX_CONFIG_SIZE};
use wazuh_proxy::nginx;
use wazuh_proxy_test_support::bin;

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "wazuh-proxy-hostile-config-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// A sparse file of `len` bytes: costs no disk, reads as zeros.
    fn sparse(&self, name: &str, len: u64) -> PathBuf {
        let path = self.0.join(name);
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `wazuh-proxy check-config [--nginx] FILE`: exit status and stderr.
fn check_config(file: &Path, nginx: bool) -> (bool, String) {
    let mut cmd = bin();
    cmd.arg("check-config");
    if nginx {
        cmd.arg("--nginx");
    }
    let out = cmd.arg(file).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_100_mb_config_file_is_refused_without_reading_it_all() {
    let s = Scratch::new("big");
    let path = s.sparse("proxy.toml", 100 * 1024 * 1024);
    let started = Instant::now();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(
        e.contains(&format!("larger than {MAX_CONFIG_SIZE} bytes")),
        "{e}"
    );
    assert!(e.contains("proxy.toml"), "{e}");
    // Reading 100 MB and parsing it would take far longer than stopping at 16 MiB.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let (ok, stderr) = check_config(&path, false);
    assert!(!ok);
    assert!(stderr.contains("larger than"), "{stderr}");

    // An endless source (a character device) is cut at the same limit.
    let e = Config::load(Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than"), "{e}");

    // The nginx reader has its own, smaller limit per file.
    let e = nginx::load(&s.sparse("nginx.conf", 100 * 1024 * 1024))
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than"), "{e}");
}

#[test]
fn binary_garbage_is_a_clear_error() {
    let s = Scratch::new("garbage");
    // Not UTF-8.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .chain([0xff, 0xfe])
        .collect();
    let path = s.file("proxy.toml", &garbage);
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("not UTF-8"), "{e}");
    let (ok, stderr) = check_config(&path, false);
    assert!(!ok && stderr.contains("not UTF-8"), "{stderr}");
    let e = nginx::load(&path).unwrap_err().to_string();
    assert!(e.contains("not UTF-8"), "{e}");

    // UTF-8 but not TOML: an error with its line and column.
    let path = s.file("text.toml", "\u{1}\u{2}=\n[[[listener\n\0".as_bytes());
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("text.toml:1:"), "{e}");
    let (ok, stderr) = check_config(&path, true);
    assert!(!ok && stderr.contains("text.toml:"), "{stderr}");
}

#[test]
fn deeply_nested_toml_and_nginx_blocks_are_refused_without_a_stack_overflow() {
    let s = Scratch::new("deep");
    let depth = 100_000;
    for (name, text) in [
        (
            "arrays.toml",
            format!("x = {}{}\n", "[".repeat(depth), "]".repeat(depth)),
        ),
        (
            "tables.toml",
            format!("x = {}{}\n", "{ a = ".repeat(depth), "}".repeat(depth)),
        ),
        (
            "dotted.toml",
            format!("{} = 1\n", vec!["a"; depth].join(".")),
        ),
    ] {
        let path = s.file(name, text.as_bytes());
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
        let (ok, stderr) = check_config(&path, false);
        assert!(!ok && stderr.contains(name), "{name}: {stderr}");
    }
    let path = s.file(
        "nginx.conf",
        format!("{}{}", "a {".repeat(depth), "}".repeat(depth)).as_bytes(),
    );
    let e = nginx::load(&path).unwrap_err().to_string();
    assert!(e.contains("nested more than"), "{e}");
    let (ok, stderr) = check_config(&path, true);
    assert!(!ok && stderr.contains("nested more than"), "{stderr}");
}
