//! Bytes from a client before the TLS handshake: the ClientHello reader.
//! The body is `tollgate::fuzzing::client_hello`, which the test suite runs too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate::fuzzing::client_hello(data));
