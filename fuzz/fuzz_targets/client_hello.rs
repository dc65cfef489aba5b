//! Bytes from a client before the TLS handshake: the ClientHello reader.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tollgate::proxy::clienthello::parse_client_hello(data);
    let rt = tokio_rt();
    rt.block_on(async {
        let mut r = data;
        let _ = tollgate::proxy::clienthello::read_client_hello(&mut r).await;
    });
});

fn tokio_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}
