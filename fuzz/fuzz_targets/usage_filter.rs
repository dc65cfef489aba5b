//! The filter that hides an injected usage chunk from the client: any
//! input, any split, never panics, and never emits more than it was given
//! (it only removes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::providers::BodyFilter;
use tollgate::providers::openai::UsageChunkFilter;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let step = 1 + data[0] as usize % 61;
    let mut f = UsageChunkFilter::default();
    let mut out = Vec::new();
    for chunk in data[1..].chunks(step) {
        f.filter(chunk, &mut out);
    }
    f.finish(&mut out);
    assert!(out.len() <= data.len() - 1);
});
