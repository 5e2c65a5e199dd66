//! The binary's global allocator: mimalloc, asked for alignment only when a layout needs
//! more than every mimalloc block has.
//!
//! `mimalloc::MiMalloc` (0.1.52) hands every allocation to `mi_malloc_aligned(size,
//! align)`. In mimalloc v3 (what libmimalloc-sys 0.1.49 builds) that call takes its fast
//! path only for sizes up to 1 KiB; a larger block is given without over-allocating only
//! when its size class is a power of two (`mi_malloc_is_naturally_aligned` in
//! `alloc-aligned.c` no longer accepts any alignment up to 16 bytes, as v2's did). So
//! every `Vec`, buffer or boxed future of 1 025 bytes or more whose class is not a power
//! of two (1 280, 1 536, 1 792, 2 560, ...) went through `..._aligned_at_overalloc`: it
//! asks for `size + align - 1` bytes, so a 1 280-byte buffer took a 1 536-byte block, and
//! costs about 400 instructions more than `mi_malloc` (callgrind: 8 such allocations per
//! proxied read; docs/PERFORMANCE.md, issue 24 sixth session).
//!
//! Decision: a layout whose alignment is at most a machine word goes to `mi_malloc` /
//! `mi_zalloc` / `mi_realloc`, which give every block at least word alignment (mimalloc's
//! size classes are whole words); any other layout (tokio's task cells and channels are
//! aligned to 128 bytes, `u128` to 16) keeps the aligned calls, as before (mimalloc's own
//! `mi_realloc_aligned` makes the same choice: an alignment of at most a `uintptr_t` is a
//! plain realloc, v3 `alloc-aligned.c`). Frees go to `mi_free` either way: mimalloc
//! finds a block's page from any pointer into it.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// Every mimalloc block is aligned to at least this: its block sizes are whole words.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc, without the aligned entry points for word-aligned layouts (module doc).
pub struct Mimalloc;

// SAFETY: every method hands the layout's size to mimalloc, which returns null or a block
// of at least that size aligned to at least `WORD` (plain calls, used only when the
// layout asks for no more) or to the layout's alignment (the aligned calls); `dealloc`
// and `realloc` get only pointers these methods returned, which mimalloc frees and
// resizes whichever call made them.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= WORD {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= WORD {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: see the impl.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl; the alignment stays the layout's, so a block made by the
        // aligned calls is resized by the aligned call.
        unsafe {
            if layout.align() <= WORD {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::Mimalloc;

    /// The block mimalloc gave for `ptr`, in bytes.
    fn usable(ptr: *const u8) -> usize {
        // SAFETY: `ptr` is a live block from mimalloc.
        unsafe { libmimalloc_sys::mi_usable_size(ptr.cast()) }
    }

    /// The regression: through `mimalloc::MiMalloc` a word-aligned 1 280-byte allocation
    /// (one of mimalloc's size classes) took a 1 536-byte block by the over-allocating
    /// path. Through the binary's global allocator it gets its own size class.
    #[test]
    fn a_word_aligned_buffer_above_1_kib_gets_its_own_size_class() {
        for size in [1280usize, 1536, 1792, 2560, 3072] {
            let v: Vec<u8> = Vec::with_capacity(size);
            assert_eq!(usable(v.as_ptr()), size, "a {size}-byte Vec<u8>");
            let w: Vec<u64> = Vec::with_capacity(size / 8);
            assert_eq!(usable(w.as_ptr().cast()), size, "a {size}-byte Vec<u64>");
        }
    }

    /// Every alignment up to 64 KiB, allocated, zeroed, grown and shrunk: aligned, zero
    /// where asked, contents kept.
    #[test]
    fn every_alignment_is_honoured_through_alloc_zeroed_and_realloc() {
        let a = Mimalloc;
        for shift in 0..=16 {
            let align = 1usize << shift;
            for size in [1usize, 7, 24, 100, 1025, 1280, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: a non-zero size; every block is freed with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc {size} align {align}");
                    p.write_bytes(0xA5, size);
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "grow {size} align {align}");
                    assert!((0..size).all(|i| *grown.add(i) == 0xA5), "grow kept");
                    let grown_layout = Layout::from_size_align(size * 3, align).expect("l");
                    let shrunk = a.realloc(grown, grown_layout, size.div_ceil(2));
                    assert_eq!(shrunk as usize % align, 0, "shrink {size} align {align}");
                    assert!((0..size.div_ceil(2)).all(|i| *shrunk.add(i) == 0xA5));
                    let small = Layout::from_size_align(size.div_ceil(2), align).expect("l");
                    a.dealloc(shrunk, small);

                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed {size} align {align}");
                    assert!((0..size).all(|i| *z.add(i) == 0), "zeroed {size}");
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
