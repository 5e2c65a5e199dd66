//! Which events of a watched directory mean that its files changed, for the two
//! directory watchers (plugins, Lua rules).
//!
//! The Linux backend of `notify` also reports opening a file and closing it without
//! writing: the daemon's own reads of the files it watches. Those must not count, or a
//! reload (which reads the files) triggers the next one, forever.

use notify_debouncer_full::notify::EventKind;
use notify_debouncer_full::notify::event::{AccessKind, AccessMode};

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
