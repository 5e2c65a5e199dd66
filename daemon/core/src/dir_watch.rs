//! Which events of a watched directory mean that its files changed, for the two
//! directory watchers (plugins, Lua rules).
//!
//! The Linux backend of `notify` also reports opening a file and closing it without
//! writing: the daemon's own reads of the files it watches. Those must not count, or a
//! reload (which reads the files) triggers the next one, forever.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use notify_debouncer_full::notify::event::{AccessKind, AccessMode};
use notify_debouncer_full::notify::{self, EventKind, RecursiveMode, Watcher};
use notify_debouncer_full::{Debouncer, FileIdCache};

/// How often a watcher checks that its path still names the directory it watches
/// ([`Identity`]).
pub const RECHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// What a watched directory's path names now, against when it was last looked at.
#[derive(Debug, PartialEq, Eq)]
pub enum Recheck {
    /// The same directory.
    Same,
    /// Another directory than the one watched (moved aside and made anew, a deploy that
    /// swaps directories): watch it instead.
    Replaced,
    /// No directory (removed, moved away).
    Gone,
}

/// Which directory a watched path named when it was watched (device and inode): an
/// inotify watch follows the directory, not the path, so a directory moved aside and
/// made anew would leave the watcher on the old one without a word (an outside review:
/// plugin files put into the new directory were never loaded, nor a removed one
/// dropped).
#[derive(Debug)]
pub struct Identity {
    dir: PathBuf,
    seen: Option<(u64, u64)>,
}

impl Identity {
    /// The directory `dir` names now (none if it does not exist or is no directory).
    pub fn of(dir: &Path) -> Identity {
        Identity {
            dir: dir.to_path_buf(),
            seen: current(dir),
        }
    }

    /// Looks again; remembers what the path names now.
    pub fn recheck(&mut self) -> Recheck {
        let now = current(&self.dir);
        if now == self.seen {
            return Recheck::Same;
        }
        self.seen = now;
        match now {
            Some(_) => Recheck::Replaced,
            None => Recheck::Gone,
        }
    }

    /// [`Identity::recheck`], and when the path names another directory, `debouncer`'s
    /// watch moved onto it (non-recursive, as both watchers watch); `Err` when the new
    /// directory cannot be watched.
    pub fn follow<W: Watcher, C: FileIdCache>(
        &mut self,
        debouncer: &mut Debouncer<W, C>,
    ) -> notify::Result<Recheck> {
        let r = self.recheck();
        if r == Recheck::Replaced {
            // The old watch may be gone with its directory: nothing to undo then.
            let _ = debouncer.unwatch(&self.dir);
            debouncer.watch(&self.dir, RecursiveMode::NonRecursive)?;
        }
        Ok(r)
    }
}

fn current(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

/// True for an event that changes a file or the directory: a file created, written
/// (modified, or closed after writing), renamed, removed, or its metadata changed (a
/// `chmod` that makes a refused plugin file acceptable); false for opening, reading and
/// closing without writing, which the daemon's own reads cause. An event of an unknown
/// kind counts (better one reload too many than a change missed).
pub fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_replaced_or_gone_is_told_once() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("watched");
        std::fs::create_dir(&dir).unwrap();
        let mut id = Identity::of(&dir);
        assert_eq!(id.recheck(), Recheck::Same);
        std::fs::rename(&dir, t.path().join("aside")).unwrap();
        assert_eq!(id.recheck(), Recheck::Gone);
        assert_eq!(id.recheck(), Recheck::Same, "told once");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(id.recheck(), Recheck::Replaced);
        assert_eq!(id.recheck(), Recheck::Same);
        std::fs::rename(&dir, t.path().join("aside2")).unwrap();
        std::fs::rename(t.path().join("aside"), &dir).unwrap();
        assert_eq!(id.recheck(), Recheck::Replaced, "another directory at once");
    }
    use notify_debouncer_full::notify::event::{
        CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind, RenameMode,
    };

    #[test]
    fn reads_are_no_change_and_writes_renames_removals_are() {
        let cases = [
            (EventKind::Access(AccessKind::Open(AccessMode::Any)), false),
            (EventKind::Access(AccessKind::Read), false),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                false,
            ),
            (EventKind::Other, false),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                true,
            ),
            (EventKind::Create(CreateKind::File), true),
            (EventKind::Modify(ModifyKind::Data(DataChange::Any)), true),
            (EventKind::Modify(ModifyKind::Name(RenameMode::To)), true),
            (
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
                true,
            ),
            (EventKind::Remove(RemoveKind::File), true),
            (EventKind::Any, true),
        ];
        for (kind, want) in cases {
            assert_eq!(is_change(&kind), want, "{kind:?}");
        }
    }
}
