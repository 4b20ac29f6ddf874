//! Loud skips: a test whose prerequisite is missing says so on the real standard error (the
//! harness shows `eprintln!` only for failing tests), and fails instead where CI provides it.

use std::io::Write;

/// Whether this run is CI's (`CI=true`), where every prerequisite is installed.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Says loudly that a test skipped, without failing (prerequisites CI cannot provide either,
/// such as capabilities the container lacks).
pub fn skipped(what: &str) {
    let bar = "!".repeat(72);
    let _ = writeln!(std::io::stderr(), "\n{bar}\n!!! SKIPPED: {what}\n{bar}\n");
}

/// Says loudly that a test skipped; fails when `CI=true` (CI provides the prerequisite).
pub fn skip_or_fail_in_ci(why: &str) {
    skipped(why);
    assert!(
        !in_ci(),
        "CI=true and this test's prerequisite is missing: {why}"
    );
}
