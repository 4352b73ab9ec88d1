//! The validator the tests use: `validate.py` with each FHIRPath invariant parsed once
//! (`tests/conformance/validate_parse_once.py`) gives exactly the reports of `validate.py`
//! run directly, over the official notification examples of R5, R4B and R4 and mutations
//! of them that break every layer, FHIRPath invariants included.

use crate::common::*;
use std::process::Command;

#[test]
fn parsing_each_invariant_once_changes_no_report() {
    let (r5, r4) = validator_pythons();
    let out = Command::new("python3")
        .arg(repo().join("tests/conformance/check_parse_once.py"))
        .args([&r5, &r4])
        .arg(validate_py())
        .output()
        .expect("run check_parse_once.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the wrapper changed a report:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The corpus must have produced failures in the layer the cache touches.
    assert!(stdout.contains("identical"), "{stdout}");
    assert!(stdout.contains("\"invariant\":"), "{stdout}");
    eprintln!("{stdout}");
}
