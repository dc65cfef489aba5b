//! The filter that hides an injected usage chunk from the client: any
//! input, any split, never panics, and never emits more than it was given
//! (it only removes).
//! The body is `tollgate::fuzzing::usage_filter`, which the test suite runs too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate::fuzzing::usage_filter(data));
