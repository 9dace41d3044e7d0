//! A run refuses, before it starts, to save over the snapshot it restores
//! from, whatever name the save is given.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_proto::Layout;
use apf::{GuestAddress, GuestRam};
use vmm::config::RunConfig;
use vmm::mem::GuestAccess;
use vmm::snapshot::{self, SnapshotError};
use vmm::vm::VmError;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("apf-snapshot-run-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A real snapshot of a 16 MiB guest, saved without running one.
fn snapshot_in(dir: &Path) -> PathBuf {
    let layout = Layout::new(16 << 20, 1).unwrap();
    let ram = Arc::new(GuestRam::anonymous(&[(GuestAddress(0), 16 << 20)]).unwrap());
    let path = dir.join("snap");
    snapshot::save(&path, &GuestAccess::Plain(ram), &layout, 5, None).unwrap();
    path
}

#[test]
fn a_run_refuses_to_save_over_its_restore_source() {
    let dir = temp_dir("refuse");
    let source = snapshot_in(&dir);
    let before = std::fs::read(&source).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&source, &link).unwrap();
    let hard = dir.join("hard");
    std::fs::hard_link(&source, &hard).unwrap();
    for save in [&source, &link, &hard] {
        let cfg = RunConfig { restore: Some(link.clone()), save_snapshot: Some(save.clone()), ..Default::default() };
        match vmm::vm::run(&cfg) {
            Err(VmError::Snapshot(SnapshotError::RestoreSource { path })) => assert_eq!(&path, save),
            Err(e) => panic!("save to {}: {e}", save.display()),
            Ok(r) => panic!("save to {} over the restore source ran: {}", save.display(), r.summary()),
        }
    }
    assert!(std::fs::read(&source).unwrap() == before);
    std::fs::remove_dir_all(dir).unwrap();
}
