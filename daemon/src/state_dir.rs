//! The state directory holds secrets: the database (plugins' keys, some in clear, see
//! ARCHITECTURE.md "State directory"), `admin.key` and the CA's private key. At start
//! [`make_private`] takes group and others' access away from the directory and those
//! files, and says so; what it cannot tighten stops the start.
//!
//! Decision: tighten rather than refuse. systemd's `StateDirectory=` (mode 0755 unless
//! `StateDirectoryMode=` says otherwise), a hand-made directory, or a restored backup
//! leave modes nobody chose; the daemon's user owns them and can fix them, and one warning
//! line tells the operator it did. A directory or file it does not own, or one on a
//! read-only file system, is refused with a message naming the path and its mode.

use std::io;
use std::path::{Path, PathBuf};

/// The files of the state directory that hold secrets (the database and its WAL files,
/// the first admin key, the CA's private key).
pub const SECRET_FILES: [&str; 5] = [
    crate::store::sqlite::DB_FILE,
    "connectord.db-wal",
    "connectord.db-shm",
    crate::auth::ADMIN_KEY_FILE,
    crate::certs::CA_KEY_FILE,
];

/// Permission bits of group and others.
const GROUP_OTHERS: u32 = 0o077;

/// The state directory (or a secret in it) may be open to group or others and cannot be
/// made private (or not even examined). The I/O error is part of the message, not a
/// source: the message is the whole story, printed once.
#[derive(Debug, thiserror::Error)]
#[error("state directory: {}: {problem}", path.display())]
pub struct NotPrivate {
    pub path: PathBuf,
    pub problem: String,
}

/// Another process holds the state directory's lock ([`lock`]), or the lock cannot be
/// taken.
#[derive(Debug, thiserror::Error)]
#[error("state directory: {}: {problem}", path.display())]
pub struct Locked {
    pub path: PathBuf,
    pub problem: String,
}

/// Takes the state directory's lock for this process's life (an exclusive `flock` on the
/// directory itself, released by the kernel when the process ends however it ends, so a
/// `kill -9` leaves no stale lock; no file is created, so a start that fails leaves the
/// directory as it was). `Ok(None)` when the directory does not exist yet: the caller
/// takes it once the store made it.
///
/// Decision (an outside review ran a second daemon on a copied configuration with only
/// its ports changed: both served one `connectord.db`, each with its own view of the
/// registrations, taking each other's devices): one daemon per state directory, as one
/// process per node name on NATS (`cluster::check_name_free`). `connectord plugin-call`
/// takes no lock: it writes plugin state beside a running daemon by design.
pub fn lock(dir: &Path) -> Result<Option<std::fs::File>, Locked> {
    let locked = |problem: String| Locked {
        path: dir.to_path_buf(),
        problem,
    };
    let d = match std::fs::File::open(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(locked(format!("cannot open it to take its lock: {e}"))),
    };
    match d.try_lock() {
        Ok(()) => Ok(Some(d)),
        Err(std::fs::TryLockError::WouldBlock) => Err(locked(
            "another connectord process serves this state directory (it holds its lock); stop it first, or give this daemon a [state] dir of its own"
                .into(),
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(locked(format!("cannot take its lock: {e}")))
        }
    }
}

/// Makes `dir` mode 0700 and each of its [`SECRET_FILES`] 0600 where group or others had
/// any access; returns each path changed with its old mode, and logs them in one warning
/// line. A missing directory or file is left alone (the daemon creates them private).
pub fn make_private(dir: &Path) -> Result<Vec<(PathBuf, u32)>, NotPrivate> {
    let mut changed = Vec::new();
    tighten(dir, 0o700, &mut changed)?;
    for f in SECRET_FILES {
        tighten(&dir.join(f), 0o600, &mut changed)?;
    }
    if !changed.is_empty() {
        let list: Vec<String> = changed
            .iter()
            .map(|(p, m)| format!("{} (was {m:o})", p.display()))
            .collect();
        tracing::warn!(
            "state directory: took group and others' access away from {}",
            list.join(", ")
        );
    }
    Ok(changed)
}

fn tighten(path: &Path, want: u32, changed: &mut Vec<(PathBuf, u32)>) -> Result<(), NotPrivate> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(NotPrivate {
                path: path.to_path_buf(),
                problem: format!("cannot check that it is private ({e})"),
            });
        }
    };
    if mode & GROUP_OTHERS == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(want)).map_err(|e| {
        NotPrivate {
            path: path.to_path_buf(),
            problem: format!(
                "accessible to group or others (mode {mode:o}) and cannot be made private ({e}); chmod {want:o} it, or run as its owner"
            ),
        }
    })?;
    changed.push((path.to_path_buf(), mode));
    Ok(())
}

/// The files that say a state directory has been used before: a missing or empty
/// database beside any of them is not a first start.
pub const EVIDENCE_FILES: [&str; 4] = [
    crate::auth::ADMIN_KEY_FILE,
    crate::certs::CA_KEY_FILE,
    crate::certs::CA_CERT_FILE,
    "connectord.db-wal",
];

/// The state files contradict each other: the database is gone or empty while files of
/// an earlier start are there (so the database was lost, not never made).
#[derive(Debug, thiserror::Error)]
#[error(
    "state directory {}: {} is {db_state} but {} exist{}: this is not a first start, and starting on an empty database would lose every registration, access key and subscription. Restore {} from a backup, or start once with `connectord run --reinit` to begin with a new, empty database (the CA is kept; admin.key is moved aside and a new admin key is written)",
    dir.display(),
    dir.join(crate::store::sqlite::DB_FILE).display(),
    found.join(", "),
    if found.len() == 1 { "s" } else { "" },
    crate::store::sqlite::DB_FILE
)]
pub struct Contradiction {
    pub dir: PathBuf,
    /// "missing" or "empty (0 bytes)".
    pub db_state: &'static str,
    /// The [`EVIDENCE_FILES`] found.
    pub found: Vec<String>,
}

/// Checks, before anything is created, that the state files agree: a database that is
/// missing or 0 bytes long beside an existing `admin.key`, CA or WAL file is a
/// [`Contradiction`]. Decision: refuse rather than start afresh, since the old start
/// treated such a directory as a first start and overwrote `admin.key`; the operator says
/// otherwise with `--reinit` ([`reinit`]).
pub fn check_consistent(dir: &Path) -> Result<(), Contradiction> {
    let db = dir.join(crate::store::sqlite::DB_FILE);
    let db_state = match std::fs::metadata(&db) {
        Ok(m) if m.len() > 0 => return Ok(()),
        Ok(_) => "empty (0 bytes)",
        Err(_) => "missing",
    };
    let found: Vec<String> = EVIDENCE_FILES
        .iter()
        .filter(|f| std::fs::metadata(dir.join(f)).is_ok_and(|m| m.len() > 0))
        .map(|f| f.to_string())
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    Err(Contradiction {
        dir: dir.to_path_buf(),
        db_state,
        found,
    })
}

/// `connectord run --reinit` on contradicting state files: moves `admin.key` and the
/// lost database's WAL files aside (renamed with `.before-reinit-<unix seconds>`, never
/// deleted or overwritten) and removes an empty database, so that the start makes a new
/// database and admin key. The CA is kept: the certificates it issued stay valid, and it
/// does not depend on the database. Returns the paths moved aside.
pub fn reinit(c: &Contradiction) -> io::Result<Vec<PathBuf>> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut moved = Vec::new();
    for f in [
        crate::auth::ADMIN_KEY_FILE,
        "connectord.db-wal",
        "connectord.db-shm",
    ] {
        let from = c.dir.join(f);
        if from.exists() {
            let to = c.dir.join(format!("{f}.before-reinit-{stamp}"));
            if to.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", to.display()),
                ));
            }
            std::fs::rename(&from, &to)?;
            moved.push(to);
        }
    }
    let db = c.dir.join(crate::store::sqlite::DB_FILE);
    if std::fs::metadata(&db).is_ok_and(|m| m.len() == 0) {
        std::fs::remove_file(&db)?;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn chmod(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn open_modes_are_tightened_and_reported_private_ones_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        // (file, mode before, mode after)
        let table = [
            ("connectord.db", 0o644, 0o600),
            ("connectord.db-wal", 0o640, 0o600),
            ("admin.key", 0o600, 0o600),
            ("ca.key.pem", 0o604, 0o600),
            ("ca.cert.pem", 0o644, 0o644),
        ];
        for (f, before, _) in table {
            std::fs::write(dir.join(f), "x").unwrap();
            chmod(&dir.join(f), before);
        }
        let changed = make_private(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for (f, _, after) in table {
            assert_eq!(mode(&dir.join(f)), after, "{f}");
        }
        assert_eq!(
            changed,
            vec![
                (dir.clone(), 0o755),
                (dir.join("connectord.db"), 0o644),
                (dir.join("connectord.db-wal"), 0o640),
                (dir.join("ca.key.pem"), 0o604),
            ]
        );
        // Nothing left to do the second time; a missing directory is no error.
        assert!(make_private(&dir).unwrap().is_empty());
        assert!(make_private(&tmp.path().join("absent")).unwrap().is_empty());
    }
}
