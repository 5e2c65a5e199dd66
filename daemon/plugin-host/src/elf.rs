//! A check that a plugin file is a complete ELF shared object of this machine, made
//! before `dlopen` maps it: `dlopen` trusts the file's headers, and a segment that lies
//! past the end of a file cut short (or still being written) is mapped anyway, and the
//! first touch of it kills the process with SIGBUS.
//!
//! Hand-written (the header, program and section header tables are read at fixed
//! offsets) rather than through `goblin` or `object`: this is all the loader needs of
//! ELF, and it is a few dozen lines without a new dependency.

/// The ELF `e_machine` of the architecture this binary is built for; `None` where this
/// list does not know it (the machine is then not checked, `dlopen` still is).
const MACHINE: Option<u16> = if cfg!(target_arch = "x86_64") {
    Some(62)
} else if cfg!(target_arch = "aarch64") {
    Some(183)
} else if cfg!(target_arch = "x86") {
    Some(3)
} else if cfg!(target_arch = "arm") {
    Some(40)
} else if cfg!(any(target_arch = "riscv64", target_arch = "riscv32")) {
    Some(243)
} else if cfg!(target_arch = "powerpc64") {
    Some(21)
} else if cfg!(target_arch = "powerpc") {
    Some(20)
} else if cfg!(target_arch = "s390x") {
    Some(22)
} else if cfg!(target_arch = "loongarch64") {
    Some(258)
} else {
    None
};

const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ELFDATA2MSB: u8 = 2;
const ET_DYN: u16 = 3;
const SHT_NOBITS: u32 = 8;

/// Reads little- or big-endian fields of the file, each checked against its length.
struct Reader<'a> {
    bytes: &'a [u8],
    little: bool,
}

impl Reader<'_> {
    fn field<const N: usize>(&self, at: u64) -> Option<[u8; N]> {
        let at = usize::try_from(at).ok()?;
        self.bytes.get(at..at.checked_add(N)?)?.try_into().ok()
    }
    fn u16(&self, at: u64) -> Option<u16> {
        let b = self.field::<2>(at)?;
        Some(if self.little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    }
    fn u32(&self, at: u64) -> Option<u32> {
        let b = self.field::<4>(at)?;
        Some(if self.little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }
    fn u64(&self, at: u64) -> Option<u64> {
        let b = self.field::<8>(at)?;
        Some(if self.little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    }
    /// A word: 8 bytes in a 64-bit file, 4 in a 32-bit one.
    fn word(&self, at: u64, wide: bool) -> Option<u64> {
        if wide {
            self.u64(at)
        } else {
            self.u32(at).map(u64::from)
        }
    }
}

/// Checks that `bytes` (a whole file) is an ELF shared object for this machine whose
/// program headers, segments, section headers and sections all lie within the file.
/// The error says what is wrong, for the log.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    let len = bytes.len() as u64;
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file (no ELF magic)".into());
    }
    let (class, data) = match (bytes.get(4), bytes.get(5)) {
        (Some(c), Some(d)) => (*c, *d),
        _ => return Err(incomplete("its ELF header", 16, len)),
    };
    let wide = cfg!(target_pointer_width = "64");
    let (want_class, bits) = if wide {
        (ELFCLASS64, 64)
    } else {
        (ELFCLASS32, 32)
    };
    if class != want_class {
        let found = match class {
            ELFCLASS32 => "32-bit",
            ELFCLASS64 => "64-bit",
            _ => "unknown-class",
        };
        return Err(format!("a {found} ELF file, this connectord is {bits}-bit"));
    }
    let little = match data {
        ELFDATA2LSB => true,
        ELFDATA2MSB => false,
        other => return Err(format!("an ELF file of unknown byte order {other}")),
    };
    if little != cfg!(target_endian = "little") {
        return Err("an ELF file of the other byte order than this machine's".into());
    }
    let r = Reader { bytes, little };
    let header_len: u64 = if wide { 64 } else { 52 };
    if len < header_len {
        return Err(incomplete("its ELF header", header_len, len));
    }
    let field = |v: Option<u64>| v.ok_or_else(|| incomplete("its ELF header", header_len, len));
    let e_type = field(r.u16(16).map(u64::from))?;
    if e_type != u64::from(ET_DYN) {
        return Err(format!(
            "not an ELF shared object (ELF type {e_type}; a plugin is built with crate-type = [\"cdylib\"])"
        ));
    }
    let machine = field(r.u16(18).map(u64::from))?;
    if let Some(want) = MACHINE
        && machine != u64::from(want)
    {
        return Err(format!(
            "built for ELF machine {machine}, this connectord runs on {} (ELF machine {want})",
            std::env::consts::ARCH
        ));
    }
    let (phoff, shoff) = if wide {
        (field(r.u64(32))?, field(r.u64(40))?)
    } else {
        (
            field(r.u32(28).map(u64::from))?,
            field(r.u32(32).map(u64::from))?,
        )
    };
    let (ph_at, sh_at) = if wide { (54, 58) } else { (42, 46) };
    let phentsize = field(r.u16(ph_at).map(u64::from))?;
    let phnum = field(r.u16(ph_at + 2).map(u64::from))?;
    let shentsize = field(r.u16(sh_at).map(u64::from))?;
    let mut shnum = field(r.u16(sh_at + 2).map(u64::from))?;

    let (ph_min, sh_min) = if wide { (56, 64) } else { (32, 40) };
    if phnum == 0 {
        return Err("an ELF file without program headers (nothing to load)".into());
    }
    if phentsize < ph_min {
        return Err(format!(
            "an ELF file with program headers of {phentsize} bytes"
        ));
    }
    table_within("its program header table", phoff, phentsize, phnum, len)?;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let (offset, filesz) = if wide {
            (r.u64(at + 8), r.u64(at + 32))
        } else {
            (r.u32(at + 4).map(u64::from), r.u32(at + 16).map(u64::from))
        };
        let (Some(offset), Some(filesz)) = (offset, filesz) else {
            return Err(incomplete("its program header table", at + phentsize, len));
        };
        within(&format!("its segment {i}"), offset, filesz, len)?;
    }
    if shoff != 0 {
        if shentsize < sh_min {
            return Err(format!(
                "an ELF file with section headers of {shentsize} bytes"
            ));
        }
        // More sections than e_shnum holds: the count is the first section's size.
        if shnum == 0 {
            table_within("its section header table", shoff, shentsize, 1, len)?;
            shnum = r
                .word(shoff + if wide { 32 } else { 20 }, wide)
                .unwrap_or(0);
        }
        table_within("its section header table", shoff, shentsize, shnum, len)?;
        for i in 0..shnum {
            let at = shoff + i * shentsize;
            let kind = r.u32(at + 4);
            let (offset, size) = if wide {
                (r.u64(at + 24), r.u64(at + 32))
            } else {
                (r.u32(at + 16).map(u64::from), r.u32(at + 20).map(u64::from))
            };
            let (Some(kind), Some(offset), Some(size)) = (kind, offset, size) else {
                return Err(incomplete("its section header table", at + shentsize, len));
            };
            if kind != SHT_NOBITS {
                within(&format!("its section {i}"), offset, size, len)?;
            }
        }
    }
    Ok(())
}

fn incomplete(what: &str, end: u64, len: u64) -> String {
    format!(
        "not a complete ELF file: {what} ends at byte {end}, the file has {len} bytes (cut short, or still being written?)"
    )
}

fn within(what: &str, offset: u64, size: u64, len: u64) -> Result<(), String> {
    match offset.checked_add(size) {
        Some(end) if end <= len => Ok(()),
        Some(end) => Err(incomplete(what, end, len)),
        None => Err(format!(
            "not a valid ELF file: {what} has an offset past any file"
        )),
    }
}

fn table_within(what: &str, offset: u64, entry: u64, count: u64, len: u64) -> Result<(), String> {
    let size = entry
        .checked_mul(count)
        .ok_or_else(|| format!("not a valid ELF file: {what} is too large"))?;
    within(what, offset, size, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test binary itself is an ELF file of this machine (an executable, PIE or
    /// not); a shared object of it is made by setting the type.
    fn sample() -> Vec<u8> {
        let exe = std::env::current_exe().expect("current exe");
        let mut bytes = std::fs::read(exe).expect("read the test binary");
        let little = bytes[5] == ELFDATA2LSB;
        let t = if little {
            ET_DYN.to_le_bytes()
        } else {
            ET_DYN.to_be_bytes()
        };
        bytes[16..18].copy_from_slice(&t);
        bytes
    }

    #[test]
    fn a_whole_shared_object_of_this_machine_passes() {
        assert_eq!(check(&sample()), Ok(()));
    }

    #[test]
    fn broken_files_are_refused_with_the_reason() {
        let good = sample();
        let mut other_machine = good.clone();
        other_machine[18] ^= 0x40;
        let mut other_class = good.clone();
        other_class[4] = if other_class[4] == ELFCLASS64 { 1 } else { 2 };
        let mut exec = good.clone();
        exec[16] = 2;
        exec[17] = 0;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), "no ELF magic"),
            ("text", b"#!/bin/sh\n".to_vec(), "no ELF magic"),
            ("magic only", b"\x7fELF".to_vec(), "its ELF header ends"),
            ("header cut", good[..40].to_vec(), "its ELF header ends"),
            (
                "half",
                good[..good.len() / 2].to_vec(),
                "not a complete ELF file",
            ),
            (
                "last byte missing",
                good[..good.len() - 1].to_vec(),
                "not a complete ELF file",
            ),
            ("other machine", other_machine, "built for ELF machine"),
            (
                "other class",
                other_class,
                "-bit ELF file, this connectord is",
            ),
            ("an executable", exec, "not an ELF shared object"),
        ];
        for (name, bytes, want) in cases {
            let got = check(&bytes).expect_err(name);
            assert!(got.contains(want), "{name}: {got}");
        }
    }
}
