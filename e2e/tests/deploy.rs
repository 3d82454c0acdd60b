//! The systemd units in `deploy/`: `systemd-analyze verify` accepts them (no warnings), and
//! every flag their ExecStart passes exists in the binary it starts.

use std::path::Path;
use std::process::Command;

use cobalt_e2e::binary;

fn units() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut units: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "service"))
        .collect();
    units.sort();
    assert_eq!(units.len(), 3, "{units:?}");
    units
}

#[test]
fn the_units_verify_cleanly_and_use_only_flags_that_exist() {
    cobalt_testkit::require("systemd-analyze");
    let tmp = tempfile::tempdir().unwrap();
    for unit in units() {
        let text = std::fs::read_to_string(&unit).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("an ExecStart line");
        let mut words = exec.split_whitespace();
        let program = words.next().unwrap();
        let name = Path::new(program).file_name().unwrap().to_str().unwrap();
        let built = binary(name);
        // The flags: the binary accepts them all (clap refuses an unknown one before --help).
        let args: Vec<&str> = words.collect();
        let o = Command::new(&built)
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}: {exec}: {}",
            unit.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        // The unit itself, pointing at the built binary.
        let copy = tmp.path().join(unit.file_name().unwrap());
        std::fs::write(&copy, text.replace(program, &built.display().to_string())).unwrap();
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && stderr.trim().is_empty(),
            "{}: {stderr}",
            unit.display()
        );
    }
}
