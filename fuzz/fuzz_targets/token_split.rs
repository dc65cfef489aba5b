//! tollgate's regex-free token counter against tiktoken: for any text, the
//! pre-tokeniser's pieces equal those of the encoding's original pattern
//! (run by fancy_regex, as tiktoken does) and the tokens equal
//! tiktoken-rs's `encode_ordinary`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tiktoken_rs::CoreBPE;
use tollgate::meter::bpe::{Bpe, CL100K_PATTERN, Pattern, Splitter};

struct Reference {
    regex: fancy_regex::Regex,
    core: CoreBPE,
    bpe: Bpe,
}

fn reference(p: Pattern) -> &'static Reference {
    static CL: OnceLock<Reference> = OnceLock::new();
    static O2: OnceLock<Reference> = OnceLock::new();
    let (cell, pat, core): (_, _, fn() -> anyhow::Result<CoreBPE>) = match p {
        Pattern::Cl100k => (&CL, CL100K_PATTERN, tiktoken_rs::cl100k_base),
        Pattern::O200k => (&O2, tiktoken_rs::O200K_BASE_PAT_STR, tiktoken_rs::o200k_base),
    };
    cell.get_or_init(|| {
        let core = core().expect("encoder");
        let bpe = Bpe::from_core(p, &core).expect("ranks");
        Reference {
            regex: fancy_regex::Regex::new(pat).expect("pattern"),
            core,
            bpe,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for p in [Pattern::Cl100k, Pattern::O200k] {
        let r = reference(p);
        let want: Vec<&str> = r
            .regex
            .find_iter(text)
            .map(|m| m.expect("regex").as_str())
            .collect();
        let got: Vec<&str> = Splitter::new(p, text).collect();
        assert_eq!(got, want, "{p:?} pieces");
        assert_eq!(r.bpe.encode(text), r.core.encode_ordinary(text), "{p:?} tokens");
        assert_eq!(r.bpe.count(text), r.core.encode_ordinary(text).len() as u64);
    }
});
