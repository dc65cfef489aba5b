//! `cargo xtask demo`: the agent with its embedded defaults, attached to a
//! child cgroup, a local simulated OpenAI on a loopback address, and a few
//! real clients (curl, the Python SDK, streaming and not); then the report.

use std::net::{IpAddr, SocketAddr};

use tollgate_e2e::client::ok;
use tollgate_e2e::{Agent, AgentOptions, Client, FakeProvider, TestCgroup, TestPki};

fn main() {
    if let Some(why) = tollgate_e2e::kernel_test_unavailable() {
        eprintln!("demo: cannot run here: {why}");
        std::process::exit(77);
    }
    let cg = TestCgroup::create("demo");
    let pki = TestPki::new();
    let ip = IpAddr::V4(tollgate_e2e::provider_ip(200));
    let fake = FakeProvider::start(SocketAddr::new(ip, 443), &pki, &["api.openai.com"]);
    println!(
        "demo: simulated api.openai.com on {ip}:443; starting the agent on cgroup {}",
        cg.path().display()
    );
    let agent = Agent::start(AgentOptions {
        cgroup: cg.path().to_path_buf(),
        overrides: vec![("api.openai.com".into(), vec![ip.to_string()])],
        extra_ca: Some(pki.ca_path()),
        extra_toml: String::new(),
        join_cgroup: false,
        listen: None,
        sigterm_at: None,
        env: Vec::new(),
    });
    let mut env = agent.trust_env();
    for (k, v) in [
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_REPOSITORY", "acme/widgets"),
        ("GITHUB_WORKFLOW", "CI"),
        ("GITHUB_JOB", "review-bot"),
        ("GITHUB_RUN_ID", "1001"),
        ("GITHUB_REF_NAME", "main"),
    ] {
        env.push((k.into(), v.into()));
    }
    let client = Client::new(&cg, &[("api.openai.com", ip)], env);
    println!("demo: curl, one chat completion");
    ok(
        &client.run(&[
            "curl", "-sS", "-o", "/dev/null", "-H", "Authorization: Bearer sk-demo",
            "-H", "Content-Type: application/json",
            "-d", r#"{"model":"gpt-4o","messages":[{"role":"user","content":"lint this diff please"}],"max_tokens":60}"#,
            "https://api.openai.com/v1/chat/completions",
        ]),
        "curl",
    );
    println!("demo: python openai SDK, three calls (one streaming)");
    ok(
        &client.python(
            r#"
import openai
c = openai.OpenAI(api_key="sk-demo")
for q in ["write a unit test for parse()", "summarise the failing test"]:
    c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": q}], max_tokens=120)
for _ in c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "review"}],
        max_tokens=200, stream=True, stream_options={"include_usage": True}):
    pass
"#,
        ),
        "python",
    );
    agent.wait_for_records(4);
    let out = agent.command(&["report"]);
    println!(
        "\n$ tollgate report\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(agent);
    drop(fake);
}
