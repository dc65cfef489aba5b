//! Bytes from a provider: every adapter's response parser, in every
//! content type and encoding, fed in pieces whose sizes the input chooses.
//! The body is `tollgate::fuzzing::response_parsers`, which the test suite runs too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate::fuzzing::response_parsers(data));
