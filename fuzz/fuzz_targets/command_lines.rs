//! Redaction of a process's command line (`/proc/PID/cmdline`, arguments
//! split at NUL): never panics, and never lets a provider key passed as an
//! argument of its own, or a sensitive flag's value, through.
//! The body is `tollgate::fuzzing::command_lines`, which the test suite runs too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate::fuzzing::command_lines(data));
