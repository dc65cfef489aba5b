//! Bytes from a job: every adapter's request reader and request rewrite,
//! on any body, path and content type. Never panics; a rewrite turns a
//! valid JSON object into a valid JSON object (it adds the usage option of
//! a stream), and says so in `injected_usage`.
//! The body is `tollgate::fuzzing::requests`, which the test suite runs too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate::fuzzing::requests(data));
