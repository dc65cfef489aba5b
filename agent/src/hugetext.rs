//! Puts the agent's hot code on huge pages, when its build laid the code
//! out for that.
//!
//! Owns: one `madvise(MADV_HUGEPAGE)` at start, over the hot code that
//! `cargo xtask dist` (BOLT, after the profile-guided build) gathered at the
//! front of `.text`, aligned to 2 MiB.
//! Must never: fail or delay the agent's start (every failure is an
//! outcome to log), copy or remap code (BOLT's own `-hugify` start-up code
//! does, and ends the process where the kernel has no transparent huge
//! pages), or advise any memory but the agent's own hot code.
//!
//! Why: the request path runs cold whenever requests are apart, and on a
//! virtual machine every instruction-TLB miss is a two-dimensional page
//! walk (guest and host tables). Two 2 MiB pages cover the hot code that
//! 4 KiB pages spread over ≈750 entries; in paired bench runs this took
//! about a seventh off the added time to first chunk (README, Performance).
//! A build that was not laid out (plain, or profile-guided without BOLT)
//! is left alone: its hot code is spread through ≈27 MiB of text, and huge
//! pages over all of it would cost that much resident memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// A huge page on x86-64 and on aarch64 with 4 KiB base pages.
const HUGE: u64 = 2 << 20;
/// The section BOLT leaves the input's code in, renamed: its presence
/// says `.text` was rewritten.
const BOLT_ORIGINAL_TEXT: &[u8] = b".bolt.org.text";

/// What [`advise`] did.
#[derive(Debug)]
pub enum Outcome {
    /// The hot code (`bytes` of it, in whole huge pages) is advised onto
    /// huge pages. The kernel maps them where it can: code already read in
    /// on small pages is merged later by khugepaged, on kernels that keep
    /// read-only files in huge pages (`CONFIG_READ_ONLY_THP_FOR_FS`).
    Advised { bytes: u64 },
    /// This build's code was not laid out for huge pages (not a
    /// `cargo xtask dist` build with BOLT): nothing done.
    NotLaidOut,
    /// The kernel has no transparent huge pages, they are off, or the code
    /// was not loaded where huge pages could map it.
    Unavailable(String),
    /// Reading the binary or the advice failed.
    Failed(String),
}

/// Advises the agent's hot code onto huge pages, if the build laid it out
/// and the kernel offers them (`/sys/kernel/mm/transparent_hugepage/enabled`
/// set to `always` or `madvise`).
pub fn advise() -> Outcome {
    let hot = match File::open("/proc/self/exe").and_then(|f| hot_text(&f)) {
        Ok(Some(hot)) => hot,
        Ok(None) => return Outcome::NotLaidOut,
        Err(e) => return Outcome::Failed(format!("reading /proc/self/exe: {e}")),
    };
    match std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled") {
        Ok(mode) if thp_allows_advice(&mode) => {}
        Ok(mode) => {
            return Outcome::Unavailable(format!("transparent huge pages are `{}`", mode.trim()));
        }
        Err(e) => {
            return Outcome::Unavailable(format!("no transparent huge pages in this kernel ({e})"));
        }
    }
    let Some((bias, segments)) = program_layout() else {
        return Outcome::Failed("the program's load address is unknown".into());
    };
    let (addr, len) = match advised_range(hot, bias, &segments) {
        Ok(r) => r,
        Err(why) => return Outcome::Unavailable(why),
    };
    // SAFETY: advice only; the range is this program's own mapped code,
    // which MADV_HUGEPAGE neither moves nor changes.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE) };
    if r == 0 {
        Outcome::Advised { bytes: len }
    } else {
        Outcome::Failed(format!("madvise: {}", io::Error::last_os_error()))
    }
}

/// The hot code's link-time address and length, in whole huge pages, when
/// `exe` is an ELF64 file whose `.text` BOLT rewrote and aligned to a huge
/// page; `None` for any other build.
fn hot_text(exe: &File) -> io::Result<Option<(u64, u64)>> {
    let mut eh = [0u8; 64];
    exe.read_exact_at(&mut eh, 0)?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Ok(None); // not ELF64, little-endian
    }
    let shoff = u64_at(&eh, 0x28);
    let shentsize = u16_at(&eh, 0x3a) as u64;
    let shnum = u16_at(&eh, 0x3c) as u64;
    let shstrndx = u16_at(&eh, 0x3e) as u64;
    if shentsize < 64 || shnum == 0 || shnum > 4096 || shstrndx >= shnum {
        return Ok(None);
    }
    let mut table = vec![0u8; (shentsize * shnum) as usize];
    exe.read_exact_at(&mut table, shoff)?;
    let section = |i: u64| &table[(i * shentsize) as usize..][..64];
    let names = section(shstrndx);
    let (names_off, names_len) = (u64_at(names, 0x18), u64_at(names, 0x20));
    if names_len > 1 << 20 {
        return Ok(None);
    }
    let mut strtab = vec![0u8; names_len as usize];
    exe.read_exact_at(&mut strtab, names_off)?;
    let name = |s: &[u8]| -> &[u8] {
        let at = u32_at(s, 0) as usize;
        let rest = strtab.get(at..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    };
    let mut rewritten = false;
    let mut text = None;
    for i in 0..shnum {
        let s = section(i);
        match name(s) {
            BOLT_ORIGINAL_TEXT => rewritten = true,
            b".text" => text = Some((u64_at(s, 0x10), u64_at(s, 0x20), u64_at(s, 0x30))),
            _ => {}
        }
    }
    Ok(match text {
        Some((addr, size, align)) if rewritten && align >= HUGE && addr % HUGE == 0 && size > 0 => {
            size.checked_next_multiple_of(HUGE).map(|len| (addr, len))
        }
        _ => None,
    })
}

/// Where to advise, at run time: the hot code (`hot`, link-time address
/// and length in whole huge pages) moved by the load `bias`, cut back to
/// the huge pages that lie inside its executable segment (`segments`:
/// link-time start and end of each), so that nothing past the program's
/// code (the heap, when it follows) is advised.
fn advised_range(
    (start, len): (u64, u64),
    bias: u64,
    segments: &[(u64, u64)],
) -> Result<(u64, u64), String> {
    let Some(&(_, seg_end)) = segments.iter().find(|(a, b)| (*a..*b).contains(&start)) else {
        return Err("the hot code is in no executable segment".into());
    };
    let end = start.saturating_add(len).min(seg_end - seg_end % HUGE);
    if end <= start {
        return Err("the hot code's segment ends before a whole huge page".into());
    }
    let addr = bias.wrapping_add(start);
    if addr % HUGE != 0 {
        return Err(format!(
            "the program was loaded at {bias:#x}, where no huge page can map its code"
        ));
    }
    Ok((addr, end - start))
}

/// Whether the kernel's THP mode (`always [madvise] never`) takes advice.
fn thp_allows_advice(mode: &str) -> bool {
    mode.contains("[always]") || mode.contains("[madvise]")
}

/// Where the program itself (not a shared library) was loaded, and the
/// link-time start and end of its executable segments: the first object
/// `dl_iterate_phdr` reports.
fn program_layout() -> Option<(u64, Vec<(u64, u64)>)> {
    type Layout = Option<(u64, Vec<(u64, u64)>)>;
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid info whose `dlpi_phdr` points
        // at `dlpi_phnum` program headers; `data` is the Layout below,
        // alive for the whole iteration.
        unsafe {
            let info = &*info;
            let mut exec = Vec::new();
            if !info.dlpi_phdr.is_null() {
                for i in 0..usize::from(info.dlpi_phnum) {
                    let ph = &*info.dlpi_phdr.add(i);
                    if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
                        exec.push((ph.p_vaddr, ph.p_vaddr.saturating_add(ph.p_memsz)));
                    }
                }
            }
            *(data as *mut Layout) = Some((info.dlpi_addr, exec));
        }
        1 // stop: the program comes first
    }
    let mut layout: Layout = None;
    // SAFETY: `first` only writes through `data`, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(first), &mut layout as *mut _ as *mut libc::c_void) };
    layout
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_always_and_madvise_take_advice() {
        assert!(thp_allows_advice("[always] madvise never\n"));
        assert!(thp_allows_advice("always [madvise] never\n"));
        assert!(!thp_allows_advice("always madvise [never]\n"));
        assert!(!thp_allows_advice(""));
    }

    #[test]
    fn a_build_bolt_did_not_rewrite_is_left_alone() {
        // The test binary: an ELF64 with a `.text`, never rewritten.
        let exe = File::open("/proc/self/exe").unwrap();
        assert_eq!(hot_text(&exe).unwrap(), None);
        assert!(matches!(advise(), Outcome::NotLaidOut));
    }

    /// A minimal ELF64 file with these sections (name, address, size,
    /// alignment) and a section name table after them.
    fn elf(sections: &[(&str, u64, u64, u64)]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut headers = vec![0u8; 64]; // the null section
        for (name, addr, size, align) in sections {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&(names.len() as u32).to_le_bytes());
            h[4..8].copy_from_slice(&1u32.to_le_bytes()); // PROGBITS
            h[0x10..0x18].copy_from_slice(&addr.to_le_bytes());
            h[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            h[0x30..0x38].copy_from_slice(&align.to_le_bytes());
            headers.extend_from_slice(&h);
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        let shnum = sections.len() as u64 + 2;
        let names_at = 64 + 64 * shnum;
        let mut h = [0u8; 64];
        h[0..4].copy_from_slice(&(names.len() as u32).to_le_bytes());
        h[0x18..0x20].copy_from_slice(&names_at.to_le_bytes());
        h[0x20..0x28].copy_from_slice(&(names.len() as u64 + 10).to_le_bytes());
        names.extend_from_slice(b".shstrtab\0");
        headers.extend_from_slice(&h);
        let mut f = vec![0u8; 64];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        f[0x28..0x30].copy_from_slice(&64u64.to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&(shnum as u16).to_le_bytes());
        f[0x3e..0x40].copy_from_slice(&(shnum as u16 - 1).to_le_bytes());
        f.extend(headers);
        f.extend(names);
        f
    }

    fn hot_of(bytes: &[u8]) -> Option<(u64, u64)> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exe");
        std::fs::write(&p, bytes).unwrap();
        hot_text(&File::open(&p).unwrap()).unwrap()
    }

    #[test]
    fn the_hot_code_bolt_laid_out_is_found_in_whole_huge_pages() {
        let two = 2 << 20;
        let bolted = [
            (".bolt.org.text", 0xb8_a580, 0xd0_ad21, 64),
            (".text", 0x1a0_0000, 0x2f_05a4, two),
            (".text.cold", 0x1cf_05c0, 0x37_f73a, 64),
        ];
        // 3 MiB of hot code: two huge pages.
        assert_eq!(hot_of(&elf(&bolted)), Some((0x1a0_0000, 2 * two)));
        // Not rewritten by BOLT, or not aligned for huge pages: left alone.
        assert_eq!(hot_of(&elf(&bolted[1..])), None);
        let mut unaligned = bolted;
        unaligned[1].3 = 64;
        assert_eq!(hot_of(&elf(&unaligned)), None);
        unaligned[1] = (".text", 0x1a0_1000, 0x2f_05a4, two);
        assert_eq!(hot_of(&elf(&unaligned)), None);
    }

    #[test]
    fn the_advice_stays_inside_the_code_segment_and_on_huge_page_bounds() {
        let two = 2 << 20;
        let hot = (0x1a0_0000, 2 * two);
        let segment = [
            (0xb8_a580, 0x189_57e0),
            (0x1a0_0000, 0x1a0_0000 + 0x8e_f2c0),
        ];
        // PIE loaded on a 2 MiB boundary: the hot code's two huge pages.
        assert_eq!(
            advised_range(hot, 0x5555_5540_0000, &segment),
            Ok((0x5555_5540_0000 + 0x1a0_0000, 2 * two))
        );
        // A segment that ends 1.5 MiB into the second page: only the first.
        let short = [(0x1a0_0000, 0x1a0_0000 + two + (3 << 19))];
        assert_eq!(advised_range(hot, 0, &short), Ok((0x1a0_0000, two)));
        // Nothing whole: refused, not advised past the segment.
        let shorter = [(0x1a0_0000, 0x1a0_0000 + (3 << 19))];
        assert!(advised_range(hot, 0, &shorter).is_err());
        // Loaded on a 4 KiB boundary only, or hot code outside the segments.
        assert!(advised_range(hot, 0x5555_5540_1000, &segment).is_err());
        assert!(advised_range(hot, 0, &segment[..1]).is_err());
    }

    #[test]
    fn a_file_that_is_not_elf_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, [b'#'; 128]).unwrap();
        assert_eq!(hot_text(&File::open(&p).unwrap()).unwrap(), None);
        // Too short to hold an ELF header: an error to report, no panic.
        std::fs::write(&p, b"\x7fELF").unwrap();
        assert!(hot_text(&File::open(&p).unwrap()).is_err());
    }

    #[test]
    fn the_program_is_found_where_it_was_loaded() {
        // A position-independent program (as Rust links them) is mapped
        // from the start of its file at its load bias.
        let (bias, exec) = program_layout().unwrap();
        assert!(!exec.is_empty(), "the test binary has executable segments");
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_str().unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let first = maps
            .lines()
            .find(|l| l.ends_with(exe) && l.split_whitespace().nth(2) == Some("00000000"))
            .expect("the program's first mapping");
        let start = u64::from_str_radix(first.split('-').next().unwrap(), 16).unwrap();
        assert_eq!(bias, start, "{first}");
    }
}
