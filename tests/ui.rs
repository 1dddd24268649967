//! Compile tests of `#[idempotent]`: handlers that must compile (`ui/pass`) and mistakes that
//! must fail with an error pointing at the offending token and saying how to fix it
//! (`ui/fail`, expected output in the `.stderr` next to each case).
//!
//! Regenerate the `.stderr` files with `TRYBUILD=overwrite cargo test -p idem-tests --test ui`,
//! then read the diff.

#[test]
fn ui() {
    // Paths are relative to this package's directory, where `cargo test` runs the test.
    let cases = trybuild::TestCases::new();
    cases.pass("ui/pass/*.rs");
    cases.compile_fail("ui/fail/*.rs");
}
