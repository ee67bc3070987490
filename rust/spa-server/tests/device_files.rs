//! Device side: saving personal side weights when the disk fills up. `SidePlugin::save` writes
//! a temporary file next to the target and renames it (spa_model::io::atomic_write), so a
//! failed save is a typed error, the previous weights load unchanged, and no temporary file is
//! left behind. (Corrupt and mismatched side-weight files are covered by
//! rust/spa-model/tests/corrupt.rs and side.rs: typed CorruptSafetensors / WrongShape /
//! MismatchedBase errors.)
//!
//! The full disk is a real one: a 512 KiB tmpfs mounted for the test (needs CAP_SYS_ADMIN, as
//! root in a container usually has). Where mounting is not permitted, the write limit comes
//! from RLIMIT_FSIZE instead (the write fails with EFBIG mid-file, the same failure path);
//! the test says which one it used. This file holds one test, because the rlimit is
//! process-wide.

use spa_model::{SideConfig, SidePlugin, SpaError};
use std::path::{Path, PathBuf};
use std::process::Command;

fn plugin(width: usize, taps: Vec<usize>, seed: u64) -> SidePlugin {
    let mut cfg = SideConfig::new(576, 30, width);
    cfg.taps = taps;
    SidePlugin::init_for("base-identity", 30, cfg, "projection-fp", seed, 1.0).unwrap()
}

fn size_on_disk(p: &SidePlugin) -> usize {
    let f = std::env::temp_dir().join(format!("spa-size-{}.safetensors", std::process::id()));
    p.save(&f).unwrap();
    let n = std::fs::metadata(&f).unwrap().len() as usize;
    std::fs::remove_file(&f).unwrap();
    n
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn try_tmpfs(dir: &Path, bytes: usize) -> Option<Mount> {
    std::fs::create_dir_all(dir).ok()?;
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
        .arg("tmpfs")
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Some(Mount(dir.to_path_buf()))
    } else {
        let _ = std::fs::remove_dir(dir);
        None
    }
}

fn leftovers(dir: &Path, keep: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != keep && n != "lost+found")
        .collect()
}

#[test]
fn full_disk_while_saving_keeps_the_old_weights() {
    let old = plugin(32, vec![0, 1], 1);
    let new = plugin(64, (0..30).collect(), 2);
    let (old_size, new_size) = (size_on_disk(&old), size_on_disk(&new));
    // Room for the old file and half of the new one.
    let room = (old_size + new_size / 2).div_ceil(4096) * 4096;
    assert!(room < old_size + new_size, "sizes {old_size} / {new_size}");
    let dir = std::env::temp_dir().join(format!("spa-full-disk-{}", std::process::id()));
    let mount = try_tmpfs(&dir, room);
    let method = if mount.is_some() {
        format!("tmpfs of {room} bytes")
    } else {
        std::fs::create_dir_all(&dir).unwrap();
        // SIGXFSZ would kill the process; ignored, the write returns EFBIG.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: (new_size / 2) as libc::rlim_t,
                rlim_max: libc::RLIM_INFINITY,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        }
        format!(
            "RLIMIT_FSIZE of {} bytes (mount not permitted)",
            new_size / 2
        )
    };
    eprintln!("full disk via {method}; old file {old_size} B, new file {new_size} B");
    let path = dir.join("personal.safetensors");
    old.save(&path).expect("the old weights fit");
    let err = new.save(&path).expect_err("the new weights cannot fit");
    eprintln!("save on a full disk: {err}");
    assert!(matches!(err, SpaError::Io(_)), "{err:?}");
    // The old weights survive, bit for bit, and load as before.
    let back = SidePlugin::load(&path).expect("old weights still load");
    assert_eq!(back, old);
    assert!(
        leftovers(&dir, "personal.safetensors").is_empty(),
        "temporary files left: {:?}",
        leftovers(&dir, "personal.safetensors")
    );
    // Once there is room again (here: a smaller file), saving works.
    let small = plugin(32, vec![0, 2], 3);
    small.save(&path).unwrap();
    assert_eq!(SidePlugin::load(&path).unwrap(), small);
    if mount.is_none() {
        unsafe {
            let lim = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
        }
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        drop(mount);
    }
}
