//! The kernel exporter writes `/etc/exports.d`-style lines for the same rule sets the ganesha
//! exporter serves, and runs `exportfs -ra` only when the file changed. This machine has no
//! kernel NFS server, so `exportfs` is a stand-in that records how it was called.

use std::os::unix::fs::PermissionsExt;

use cobalt_agent::exporter::kernel::KernelExporter;
use cobalt_agent::exporter::{stable_id, ExportSet, ExportSpec, Exporter};
use cobalt_api::{Access, ExportClient};

fn spec(name: &str, uid: &str, clients: Vec<ExportClient>) -> ExportSpec {
    ExportSpec {
        name: name.into(),
        uid: uid.into(),
        source: format!("/pool/volumes/{uid}").into(),
        clients,
    }
}

#[test]
fn the_exports_file_follows_the_rules_and_exportfs_runs_only_on_change() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let fake = dir.path().join("exportfs");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", calls.display()),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exporter = KernelExporter {
        file: dir.path().join("exports.d/cobalt.exports"),
        exportfs: fake,
        port: 2049,
    };

    let mut set = ExportSet::new();
    set.insert(
        "media".into(),
        spec(
            "media",
            "u1",
            vec![
                ExportClient {
                    host: "10.0.0.0/24".into(),
                    access: Access::Rw,
                    root_squash: true,
                },
                ExportClient {
                    host: "client-7.example".into(),
                    access: Access::Ro,
                    root_squash: false,
                },
            ],
        ),
    );
    set.insert("private".into(), spec("private", "u2", vec![]));
    exporter.apply(&set).unwrap();
    let text = std::fs::read_to_string(&exporter.file).unwrap();
    let id = stable_id("u1");
    assert!(
        text.contains(&format!(
            "/pool/volumes/u1 10.0.0.0/24(rw,sync,no_subtree_check,root_squash,fsid={id}) client-7.example(ro,sync,no_subtree_check,no_root_squash,fsid={id})"
        )),
        "{text}"
    );
    assert!(!text.contains("u2"), "no clients = exported to nobody");
    assert_eq!(std::fs::read_to_string(&calls).unwrap(), "-ra\n");

    exporter.apply(&set).unwrap();
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "-ra\n",
        "unchanged: exportfs not run again"
    );

    set.remove("media");
    exporter.apply(&set).unwrap();
    assert!(!std::fs::read_to_string(&exporter.file)
        .unwrap()
        .contains("u1"));
    assert_eq!(std::fs::read_to_string(&calls).unwrap(), "-ra\n-ra\n");
}
