//! Every official SDK the issue names, end to end through the agent against
//! the fake provider: the ledger equals the provider's count for every
//! request. Root only (see e2e.rs for how they are run).

use serde_json::Value;
use tollgate_e2e::World;
use tollgate_e2e::client::ok;
use tollgate_e2e::world::CODESTRAL_HOST;

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// No secret given to a client appears in the ledger's files, the report
/// or the agent's log.
fn assert_no_secret(w: &World, secret: &str) {
    let report = w.agent.command(&["report", "--json"]);
    let ledger = w.agent.ledger_raw();
    // The scan sees the rows: a host they name is in the bytes scanned.
    let rows = w.agent.report_json();
    let host = rows
        .iter()
        .find_map(|r| r.get("host").and_then(Value::as_str))
        .unwrap_or_else(|| panic!("no row in the report: {report:?}"));
    assert!(
        ledger.windows(host.len()).any(|w| w == host.as_bytes()),
        "the ledger's bytes do not hold its rows ({host})"
    );
    for (what, text) in [
        (
            "report",
            String::from_utf8_lossy(&report.stdout).into_owned(),
        ),
        ("ledger", String::from_utf8_lossy(&ledger).into_owned()),
        ("log", w.agent.log()),
    ] {
        assert!(!text.contains(secret), "{secret} leaked into the {what}");
    }
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn openai_stream_without_include_usage_is_counted_and_the_client_sees_no_change() {
    let w = World::start("inject", 11);
    let client = w.client(&[]);
    let out = ok(
        &client.python(
            r#"
import json, openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
with c.chat.completions.with_streaming_response.create(model="gpt-4o-mini",
        messages=[{"role": "user", "content": "one two three four"}], max_tokens=6, stream=True) as r:
    raw = [l for l in r.iter_lines() if l]
print(json.dumps(raw))
"#,
        ),
        "python openai stream",
    );
    let raw: Vec<String> = serde_json::from_str(out.trim()).unwrap();
    assert!(
        raw.iter().all(|l| !l.contains("usage")),
        "client saw usage: {raw:#?}"
    );
    assert_eq!(raw.last().map(String::as_str), Some("data: [DONE]"));
    assert_eq!(
        raw.len(),
        1 + 6 + 1 + 1,
        "role chunk, 6 tokens, stop chunk, [DONE]: {raw:#?}"
    );
    assert!(
        w.fake.reported()[0].usage_sent,
        "the agent asked for usage upstream"
    );
    w.assert_ledger_matches_provider(1);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn mistral_streams_are_not_sent_stream_options_and_are_counted() {
    // Mistral refuses `stream_options` (422) and reports a stream's usage
    // in its last chunk unasked: the agent adds nothing there. The built-in
    // catalogue knows it of api.mistral.ai; codestral.mistral.ai is a
    // `[[providers]]` entry with `stream_usage = false` (see World).
    let w = World::start("mistral", 35);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import openai
for base in ("https://api.mistral.ai/v1", "https://codestral.mistral.ai/v1"):
    c = openai.OpenAI(api_key="sk-test", base_url=base, max_retries=0)
    s = c.chat.completions.create(model="mistral-small-latest", max_tokens=7, stream=True,
        messages=[{"role": "user", "content": "one two three"}])
    chunks = list(s)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).count("tok") == 7
    assert chunks[-1].usage.completion_tokens == 7, chunks[-1]
    r = c.chat.completions.create(model="mistral-small-latest", max_tokens=4,
        messages=[{"role": "user", "content": "four five"}])
    assert r.usage.completion_tokens == 4, r.usage
"#,
        ),
        "python openai against Mistral",
    );
    let reported = w.fake.reported();
    assert_eq!(reported.len(), 4, "{reported:?}");
    w.assert_ledger_matches_provider(4);
    let rows = w.agent.wait_for_records(4);
    let mut hosts: Vec<&str> = rows.iter().map(|r| r["host"].as_str().unwrap()).collect();
    hosts.sort();
    assert_eq!(
        hosts,
        [
            "api.mistral.ai",
            "api.mistral.ai",
            CODESTRAL_HOST,
            CODESTRAL_HOST
        ],
        "{rows:?}"
    );
    assert!(rows.iter().all(|r| r["estimated"] == false), "{rows:?}");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn openai_gzip_response_is_decoded_for_accounting() {
    let w = World::start("gzip", 12);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
r = c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "zip it"}],
    max_tokens=11, extra_headers={"x-fake-gzip": "1"})
assert r.usage.completion_tokens == 11, r.usage
"#,
        ),
        "python openai gzip",
    );
    w.assert_ledger_matches_provider(1);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn openai_service_tiers_are_recorded_and_priced_at_their_own_rates() {
    let w = World::start("tiers", 32);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
r = c.chat.completions.create(model="gpt-5", service_tier="flex", max_tokens=40,
    messages=[{"role": "user", "content": "cheap and slow is fine"}])
assert r.service_tier == "flex", r.service_tier
s = c.chat.completions.create(model="gpt-5", service_tier="priority", max_tokens=30, stream=True,
    messages=[{"role": "user", "content": "fast please"}])
assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices).count("tok") == 30
d = c.chat.completions.create(model="gpt-5", max_tokens=20,
    messages=[{"role": "user", "content": "whatever is usual"}])
assert d.service_tier == "default", d.service_tier
# Asked for priority, served by the default tier: the response says so.
e = c.chat.completions.create(model="gpt-5", service_tier="priority", max_tokens=20,
    messages=[{"role": "user", "content": "not granted"}],
    extra_headers={"x-fake-served-tier": "default"})
assert e.service_tier == "default", e.service_tier
"#,
        ),
        "python openai service tiers",
    );
    w.assert_ledger_matches_provider(4);
    let rows = w.agent.wait_for_records(4);
    // USD per million tokens of gpt-5 by tier: (input, output).
    for (r, tier, (input, output)) in [
        (&rows[0], "flex", (0.625, 5.0)),
        (&rows[1], "priority", (2.5, 20.0)),
        (&rows[2], "default", (1.25, 10.0)),
        (&rows[3], "default", (1.25, 10.0)),
    ] {
        assert_eq!(s(r, "service_tier"), tier, "{r}");
        let n = |k: &str| r[k].as_u64().unwrap() as f64;
        let want = (n("input_tokens") * input + n("output_tokens") * output) / 1e6;
        let got = r["cost_usd"].as_f64().expect("priced");
        assert!((got - want).abs() < 1e-12, "{tier}: {got} != {want}: {r}");
    }
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn anthropic_python_sdk_messages_stream_and_count_tokens() {
    let w = World::start("anthropic", 13);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import anthropic
c = anthropic.Anthropic(api_key="sk-ant-api03-SECRETANT", max_retries=0)
m = c.messages.create(model="claude-sonnet-4-5", max_tokens=7, system="be terse",
    messages=[{"role": "user", "content": "hello claude"}])
assert m.usage.output_tokens == 7, m.usage
with c.messages.stream(model="claude-sonnet-4-5", max_tokens=9,
        messages=[{"role": "user", "content": [{"type": "text", "text": "stream me please"}]}]) as s:
    text = "".join(s.text_stream)
assert text.count("tok") == 9, text
t = c.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "a b c"}])
assert t.input_tokens > 0
"#,
        ),
        "python anthropic",
    );
    let rows = w.assert_ledger_matches_provider(3);
    assert_eq!(s(&rows[0], "provider"), "anthropic");
    assert_eq!(s(&rows[1], "response_model"), "claude-sonnet-4-5-20250929");
    assert_eq!(s(&rows[2], "operation"), "count_tokens");
    assert_no_secret(&w, "SECRETANT");
}

/// Server-side web searches, as the official SDKs ask for them: Claude's
/// `web_search` tool (a JSON answer and a stream), Gemini's Google
/// Search grounding (2.5, billed by the grounded prompt; 3, by the
/// distinct query), and OpenAI's Responses `web_search` and earlier
/// `web_search_preview` tools (a JSON answer and a stream; the preview
/// tool is $25 per 1,000 on GPT-4.1, $10 on GPT-5). Each request is
/// recorded with the searches the provider reported, and costs the
/// search fee on top of the tokens.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn web_searches_are_recorded_and_priced_beside_the_tokens() {
    let w = World::start("web-search", 56);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import anthropic
from google import genai
from google.genai import types
c = anthropic.Anthropic(api_key="sk-ant-api03-SECRETSEARCH", max_retries=0)
ask = dict(model="claude-sonnet-4-5", max_tokens=6,
    messages=[{"role": "user", "content": "what changed in the kernel this week"}])
search = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]
m = c.messages.create(**ask, tools=search)
assert m.usage.server_tool_use.web_search_requests == 2, m.usage
c.messages.create(**ask)
with c.messages.stream(**ask, tools=search) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
assert final.usage.server_tool_use.web_search_requests == 2, final.usage
g = genai.Client(api_key="AIzaSyFAKE-SEARCH-SECRET")
grounded = types.GenerateContentConfig(max_output_tokens=4,
    tools=[types.Tool(google_search=types.GoogleSearch())])
for model in ["gemini-2.5-flash", "gemini-3-pro-preview"]:
    r = g.models.generate_content(model=model, contents="who maintains aya", config=grounded)
    assert r.candidates[0].grounding_metadata.web_search_queries, r
n = 0
for ch in g.models.generate_content_stream(model="gemini-3-pro-preview",
        contents="who maintains aya", config=grounded):
    n += 1
assert n == 4, n
import openai
o = openai.OpenAI(api_key="sk-proj-SECRETSEARCH", max_retries=0)
ask = dict(input="what changed in aya this week", max_output_tokens=5)
for model, tool in [("gpt-4.1", "web_search_preview"), ("gpt-4.1", "web_search"),
        ("gpt-5", "web_search_preview")]:
    r = o.responses.create(model=model, tools=[{"type": tool}], **ask)
    assert [i.type for i in r.output].count("web_search_call") == 3, r.output
done = [e.response for e in o.responses.create(model="gpt-4.1", stream=True,
    tools=[{"type": "web_search_preview"}], **ask) if e.type == "response.completed"]
assert len(done) == 1 and done[0].usage.input_tokens > 200, done
"#,
        ),
        "python anthropic, google-genai and openai with web search",
    );
    let rows = w.assert_ledger_matches_provider(10);
    let searches: Vec<u64> = rows
        .iter()
        .map(|r| r["web_searches"].as_u64().unwrap())
        .collect();
    assert_eq!(searches, [2, 0, 2, 1, 2, 2, 2, 2, 2, 2], "{rows:#?}");
    let cost = |r: &Value| r["cost_usd"].as_f64().expect("priced");
    let fee = cost(&rows[0]) - cost(&rows[1]);
    assert!((fee - 2.0 * 10.0 / 1000.0).abs() < 1e-9, "{fee}: {rows:#?}");
    // Gemini and OpenAI: the tokens' cost, from a price book of the same catalogue,
    // plus the fee.
    let book = tollgate::meter::pricing::PriceBook::builtin();
    let fee_is = |provider: &str, r: &Value, per_1k: f64| {
        let n = |k: &str| r[k].as_u64().unwrap();
        let usage = tollgate::meter::Usage {
            input_tokens: n("input_tokens"),
            output_tokens: n("output_tokens"),
            cached_input_tokens: n("cached_input_tokens"),
            reasoning_tokens: n("reasoning_tokens"),
            ..Default::default()
        };
        let started = r["started_at_ms"].as_i64().unwrap();
        let tokens = book
            .cost(provider, s(r, "model"), started, &usage)
            .expect("priced");
        let fee = cost(r) - tokens;
        assert!(
            (fee - r["web_searches"].as_f64().unwrap() * per_1k / 1000.0).abs() < 1e-9,
            "{fee}: {r}"
        );
    };
    fee_is("gemini", &rows[3], 35.0);
    fee_is("gemini", &rows[4], 14.0);
    // OpenAI: the preview tool on GPT-4.1 (JSON and stream), the current
    // tool, and the preview tool on a reasoning model.
    for (row, per_1k) in [(6, 25.0), (7, 10.0), (8, 10.0), (9, 25.0)] {
        fee_is("openai", &rows[row], per_1k);
    }
    assert_no_secret(&w, "SECRETSEARCH");
    assert_no_secret(&w, "FAKE-SEARCH-SECRET");
}

/// An audio chat model through the official SDK: spoken input and a
/// spoken answer are recorded apart from the text, and priced at the
/// model's audio rates (gpt-audio: 32 and 64 per million against 2.50 and
/// 10 for text).
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn audio_tokens_are_recorded_and_priced_at_their_own_rates() {
    let w = World::start("audio", 57);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import openai
o = openai.OpenAI(api_key="sk-proj-SECRETAUDIO", max_retries=0)
r = o.chat.completions.create(model="gpt-audio", max_tokens=8,
    modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"},
    messages=[{"role": "user", "content": [{"type": "text", "text": "what did I say"},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}])
assert r.choices[0].message.audio.transcript, r
assert r.usage.prompt_tokens_details.audio_tokens == 50, r.usage
assert r.usage.completion_tokens_details.audio_tokens == 6, r.usage
"#,
        ),
        "python openai audio",
    );
    let rows = w.assert_ledger_matches_provider(1);
    let r = &rows[0];
    let n = |k: &str| r[k].as_f64().unwrap();
    let want = ((n("input_tokens") - 50.0) * 2.5 + 50.0 * 32.0 + 2.0 * 10.0 + 6.0 * 64.0) / 1e6;
    let got = r["cost_usd"].as_f64().expect("priced");
    assert!((got - want).abs() < 1e-12, "{got} != {want}: {r}");
    assert_no_secret(&w, "SECRETAUDIO");
}

/// The OpenAI Realtime API through the official SDK's
/// `client.realtime.connect()`: the transcription of the job's audio and
/// every response (the one turn detection starts, the one the job asks
/// for) are each a record with the provider's usage, the audio and its
/// cache reads priced at their own rates; a response the job leaves
/// behind is recorded as such.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn realtime_sessions_are_recorded_response_by_response() {
    let w = World::start("realtime", 59);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import base64, faulthandler, openai
faulthandler.dump_traceback_later(60, exit=True)
c = openai.OpenAI(api_key="sk-proj-SECRETREALTIME", max_retries=0)
done = []
def until(conn, kind):
    for ev in conn:
        if ev.type == kind:
            return ev
with c.realtime.connect(model="gpt-realtime-mini") as conn:
    conn.session.update(session={"type": "realtime",
        "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}})
    conn.input_audio_buffer.append(audio=base64.b64encode(b"\0" * 24000).decode())
    conn.input_audio_buffer.commit()
    t = until(conn, "conversation.item.input_audio_transcription.completed")
    assert t.usage.input_tokens == 32, t.usage
    done.append(until(conn, "response.done").response.usage)
    conn.conversation.item.create(item={"type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "and again"}]})
    conn.response.create()
    done.append(until(conn, "response.done").response.usage)
    # Left before it ends.
    conn.response.create(response={"metadata": {"fake": "hang"}})
    until(conn, "response.output_audio_transcript.delta")
assert [u.input_token_details.cached_tokens for u in done] == [0, 800], done
"#,
        ),
        "python openai realtime",
    );
    let reported = w.fake.reported();
    assert_eq!(reported.len(), 3, "{reported:#?}");
    let rows = w.agent.wait_for_records(4);
    assert_eq!(rows.len(), 4, "{rows:#?}");
    for (row, rep) in rows.iter().zip(&reported) {
        tollgate_e2e::world::assert_row_matches(row, rep);
        assert_eq!(s(row, "path"), "/v1/realtime", "{row}");
    }
    assert_eq!(s(&rows[0], "operation"), "audio");
    for r in &rows[1..] {
        assert_eq!(s(r, "operation"), "realtime", "{r}");
        assert_eq!(s(r, "model"), "gpt-realtime-mini", "{r}");
    }
    let cost = |r: &Value| {
        r["cost_usd"]
            .as_f64()
            .unwrap_or_else(|| panic!("unpriced: {r}"))
    };
    let close = |got: f64, want: f64, r: &Value| {
        assert!((got - want).abs() < 1e-12, "{got} != {want}: {r}");
    };
    // gpt-4o-transcribe: audio in 6, text out 10.
    close(cost(&rows[0]), (32.0 * 6.0 + 5.0 * 10.0) / 1e6, &rows[0]);
    // gpt-realtime-mini: text 0.60 / 0.06 cached / 2.40, audio 10 / 0.30
    // cached / 20. The second turn read 200 text and 600 audio tokens
    // from the cache.
    close(
        cost(&rows[1]),
        (210.0 * 0.60 + 700.0 * 10.0 + 40.0 * 2.40 + 301.0 * 20.0) / 1e6,
        &rows[1],
    );
    close(
        cost(&rows[2]),
        (20.0 * 0.60 + 200.0 * 10.0 + 200.0 * 0.06 + 600.0 * 0.30 + 40.0 * 2.40 + 302.0 * 20.0)
            / 1e6,
        &rows[2],
    );
    let left = &rows[3];
    assert_eq!(s(left, "error"), "client_disconnected", "{left}");
    assert_eq!(left["input_tokens"], 0, "{left}");
    assert_no_secret(&w, "SECRETREALTIME");
}

/// Gemini Live through the official google-genai SDK's
/// `client.aio.live.connect()`: each turn of the model (a text turn, a
/// spoken one) is a record of the `setup`'s model with the turn's usage,
/// its audio priced at its own rates, whether the usage came with the
/// turn's end or after it; a turn the job leaves is recorded as such.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn gemini_live_sessions_are_recorded_turn_by_turn() {
    let w = World::start("gemini-live", 60);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import asyncio, faulthandler
from google import genai
faulthandler.dump_traceback_later(60, exit=True)
async def main():
    c = genai.Client(api_key="AIzaSyLIVESECRET0123456789abcdefghijklm")
    prompts = []
    async def turn(s):
        async for m in s.receive():
            if m.usage_metadata:
                prompts.append(m.usage_metadata.prompt_token_count)
    async with c.aio.live.connect(model="gemini-3.8-live",
            config={"response_modalities": ["AUDIO"]}) as s:
        await s.send_client_content(turns={"role": "user", "parts": [{"text": "hello"}]},
            turn_complete=True)
        await turn(s)
        await s.send_realtime_input(audio={"data": b"\0" * 6000, "mime_type": "audio/pcm;rate=16000"})
        await s.send_realtime_input(audio_stream_end=True)
        await turn(s)
        # A turn left before it ends; the spoken turn's usage, which came
        # after its end, is read before it.
        await s.send_client_content(turns={"role": "user", "parts": [{"text": "hang"}]},
            turn_complete=True)
        async for m in s.receive():
            if m.usage_metadata:
                prompts.append(m.usage_metadata.prompt_token_count)
            if m.server_content and m.server_content.output_transcription:
                break
    assert prompts == [100, 280], prompts
asyncio.run(main())
"#,
        ),
        "python google-genai live",
    );
    let reported = w.fake.reported();
    assert_eq!(reported.len(), 2, "{reported:#?}");
    let rows = w.agent.wait_for_records(3);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    for (row, rep) in rows.iter().zip(&reported) {
        tollgate_e2e::world::assert_row_matches(row, rep);
        assert_eq!(s(row, "operation"), "live", "{row}");
        assert_eq!(s(row, "provider"), "gemini", "{row}");
    }
    // gemini-3.8-live: text 0.75, audio 3 in; audio 12 out.
    let cost = |r: &Value| {
        r["cost_usd"]
            .as_f64()
            .unwrap_or_else(|| panic!("unpriced: {r}"))
    };
    for (r, want) in [
        (&rows[0], (100.0 * 0.75 + 201.0 * 12.0) / 1e6),
        (&rows[1], (200.0 * 0.75 + 80.0 * 3.0 + 202.0 * 12.0) / 1e6),
    ] {
        assert!((cost(r) - want).abs() < 1e-12, "{} != {want}: {r}", cost(r));
    }
    let left = &rows[2];
    assert_eq!(s(left, "model"), "gemini-3.8-live", "{left}");
    assert_eq!(s(left, "error"), "client_disconnected", "{left}");
    assert!(left["cost_usd"].is_null(), "unknown, not free: {left}");
    assert_no_secret(&w, "LIVESECRET");
}

/// Transcriptions through the Python SDK: `whisper-1`, billed by the
/// second, is priced by the length its usage reports; `gpt-4o-transcribe`
/// by its audio and text tokens.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn transcriptions_are_priced_by_their_length_or_their_tokens() {
    let w = World::start("transcriptions", 62);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import io, openai
o = openai.OpenAI(api_key="sk-proj-SECRETWHISPER", max_retries=0)
for m in ["whisper-1", "gpt-4o-transcribe"]:
    r = o.audio.transcriptions.create(model=m,
        file=("a.wav", io.BytesIO(b"RIFF" + b"\0" * 4000), "audio/wav"))
    assert r.text == "hello from the fake", r
"#,
        ),
        "python openai transcriptions",
    );
    let rows = w.assert_ledger_matches_provider(2);
    let cost = |r: &Value| {
        r["cost_usd"]
            .as_f64()
            .unwrap_or_else(|| panic!("unpriced: {r}"))
    };
    for (r, want) in [
        // $0.006 a minute, 2.5 s.
        (&rows[0], 2.5 / 60.0 * 0.006),
        // 2 text and 38 audio tokens in ($2.50, $6), 6 out ($10).
        (&rows[1], (2.0 * 2.5 + 38.0 * 6.0 + 6.0 * 10.0) / 1e6),
    ] {
        assert_eq!(s(r, "operation"), "audio", "{r}");
        assert!((cost(r) - want).abs() < 1e-12, "{} != {want}: {r}", cost(r));
    }
    assert_no_secret(&w, "SECRETWHISPER");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn an_anthropic_stream_ended_by_an_error_event_records_the_error_and_estimates_its_output() {
    let w = World::start("anthropic-error", 26);
    let client = w.client(&[]);
    let out = ok(
        &client.python(
            r#"
import anthropic
c = anthropic.Anthropic(api_key="sk-ant-api03-SECRETERR", max_retries=0)
text = ""
try:
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=500,
            messages=[{"role": "user", "content": "write a long story"}],
            extra_headers={"x-fake-error-after": "120"}) as s:
        for t in s.text_stream:
            text += t
    raise SystemExit("the stream did not fail")
except anthropic.APIError as e:
    assert "Overloaded" in str(e), e
print(text.count("tok"))
"#,
        ),
        "python anthropic",
    );
    assert_eq!(
        out.trim(),
        "120",
        "the client got 120 deltas before the error"
    );
    let rows = w.agent.wait_for_records(1);
    let r = &rows[0];
    let rep = &w.fake.reported()[0];
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(s(r, "error"), "overloaded_error", "{r}");
    // The input is the provider's (message_start); the output, which it
    // never gave, is estimated from the 120 deltas that streamed instead of
    // message_start's placeholder of 1.
    assert_eq!(r["input_tokens"], rep.input_tokens, "{r}");
    assert_eq!(r["estimated"], true, "{r}");
    let out = r["output_tokens"].as_u64().unwrap();
    assert!((100..=250).contains(&out), "{r}");
    assert_no_secret(&w, "SECRETERR");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn google_genai_python_sdk_generate_and_stream() {
    let w = World::start("gemini", 14);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
from google import genai
from google.genai import types
c = genai.Client(api_key="AIzaSyFAKE-GEMINI-SECRET")
r = c.models.generate_content(model="gemini-2.5-flash", contents="why is the sky blue",
    config=types.GenerateContentConfig(max_output_tokens=8))
assert r.usage_metadata.candidates_token_count == 8, r.usage_metadata
n = 0
for ch in c.models.generate_content_stream(model="gemini-2.5-flash", contents="count to five",
        config=types.GenerateContentConfig(max_output_tokens=5)):
    n += 1
assert n == 5, n
"#,
        ),
        "python google-genai",
    );
    let rows = w.assert_ledger_matches_provider(2);
    assert_eq!(s(&rows[0], "provider"), "gemini");
    assert_no_secret(&w, "FAKE-GEMINI-SECRET");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn google_genai_python_sdk_interactions() {
    // The Interactions API as the SDK calls it: one JSON interaction and
    // one stream, each a record with the provider's counts.
    let w = World::start("gemini-interactions", 44);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
from google import genai
c = genai.Client(api_key="AIzaSyFAKE-GEMINI-SECRET")
r = c.interactions.create(model="gemini-3-pro-preview", input="why is the sky blue",
    generation_config={"max_output_tokens": 6})
assert r.usage.total_output_tokens == 6, r.usage
done = None
for ev in c.interactions.create(model="gemini-3-pro-preview", input="count to five", stream=True):
    if ev.event_type == "interaction.completed":
        done = ev
assert done is not None and done.interaction.usage.total_output_tokens == 5, done
"#,
        ),
        "python google-genai interactions",
    );
    let rows = w.assert_ledger_matches_provider(2);
    for r in &rows {
        assert_eq!(s(r, "provider"), "gemini", "{r}");
        assert_eq!(s(r, "operation"), "interaction", "{r}");
        assert_eq!(s(r, "model"), "gemini-3-pro-preview", "{r}");
        assert!(r["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    }
    assert_no_secret(&w, "FAKE-GEMINI-SECRET");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn openai_background_responses_are_recorded_when_their_result_is_seen() {
    // Background mode as the SDK drives it: the request is answered
    // `queued`; the usage comes in a later poll, which settles the one
    // row, with the provider's counts; a cancelled one is its own row.
    let mut w = World::start("background", 46);
    let client = w.client(&[]);
    let script = r#"
import pathlib, time, openai
here = pathlib.Path(__file__).parent
c = openai.OpenAI(api_key="sk-test-BACKGROUND-SECRET", max_retries=0)
r = c.responses.create(model="gpt-5.4", input="write a long story about otters in space",
    background=True, max_output_tokens=300)
assert r.status == "queued", r.status
polls = 0
while r.status in ("queued", "in_progress"):
    time.sleep(0.05)
    r = c.responses.retrieve(r.id)
    polls += 1
assert polls == 2 and r.status == "completed" and r.usage.output_tokens == 300, (polls, r)
again = c.responses.retrieve(r.id)
assert again.status == "completed"
x = c.responses.create(model="gpt-5.4", input="never mind this one", background=True)
y = c.responses.cancel(x.id)
assert y.status == "cancelled", y.status
# A background stream the client leaves, and resumes with a retrieval.
# It holds after its first delta (a gate never opened): it cannot end
# before the client leaves.
s = c.responses.create(model="gpt-5.4", input="stream a long story", background=True, stream=True,
    max_output_tokens=50, extra_headers={"x-fake-hold": "3:" + str(here / "never")})
sid, seen = None, 0
for ev in s:
    seen = ev.sequence_number
    if ev.type == "response.created":
        sid = ev.response.id
    if ev.type == "response.output_text.delta":
        break
s.close()
# The resume comes once the agent has parked the left stream's record
# (the test opens `parked` then).
while not (here / "parked").exists():
    time.sleep(0.02)
done = None
for ev in c.responses.retrieve(sid, stream=True, starting_after=seen):
    if ev.type == "response.completed":
        done = ev.response
assert done is not None and done.usage.output_tokens == 50, done
z = c.responses.create(model="gpt-5.4", input="fetched some other way", background=True)
assert z.status == "queued"
"#;
    // The agent parks a left stream's record when it sees the job leave,
    // and only then lets go of the stream upstream (see `MeteredBody`'s
    // drop in agent/src/proxy/http.rs): once the fake provider saw the
    // stream dropped, the record waits for the resume.
    let out = std::thread::scope(|sc| {
        let running = sc.spawn(|| client.python(script));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while w.fake.streams_cut() == 0
            && !running.is_finished()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let cut = w.fake.streams_cut();
        std::fs::write(client.dir().join("parked"), "").expect("parked");
        let out = running.join().expect("client thread");
        assert_eq!(cut, 1, "the left stream was not let go: {out:?}");
        out
    });
    ok(&out, "python openai background responses");
    let reported = w.fake.reported();
    assert_eq!(reported.len(), 2, "{reported:#?}");
    let rows = w.agent.wait_for_records(3);
    assert_eq!(
        rows.len(),
        3,
        "one row per background request: {rows:#?}\n{}",
        w.agent.log()
    );
    tollgate_e2e::world::assert_row_matches(&rows[0], &reported[0]);
    assert_eq!(
        (s(&rows[0], "operation"), s(&rows[0], "method")),
        ("responses", "POST"),
        "{}",
        rows[0]
    );
    assert!(rows[0]["cost_usd"].as_f64().is_some_and(|c| c > 0.0));
    assert_eq!(s(&rows[1], "error"), "response_cancelled", "{}", rows[1]);
    assert_eq!(rows[1]["estimated"], true, "{}", rows[1]);
    assert!(rows[1]["input_tokens"].as_u64().is_some_and(|n| n > 0));
    // The stream left and resumed: the provider's counts, from the resumed
    // stream's end.
    tollgate_e2e::world::assert_row_matches(&rows[2], &reported[1]);
    // Never fetched: written, estimated, when the agent stops.
    let status = w.agent.terminate().expect("agent was running");
    assert!(status.success(), "{status}; log:\n{}", w.agent.log());
    let rows = w.agent.report_json();
    assert_eq!(rows.len(), 4, "{rows:#?}");
    assert_eq!(s(&rows[3], "error"), "background_unobserved", "{}", rows[3]);
    assert_eq!(rows[3]["estimated"], true, "{}", rows[3]);
    assert_no_secret(&w, "BACKGROUND-SECRET");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn google_genai_background_interactions_are_recorded_when_their_result_is_seen() {
    // Deep Think and Deep Research run in the background: the interaction
    // is answered running; a later poll that shows it completed settles
    // its one row; a cancelled one is its own row.
    let w = World::start("gemini-background", 47);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import time
from google import genai
c = genai.Client(api_key="AIzaSyFAKE-GEMINI-BACKGROUND")
i = c.interactions.create(model="gemini-3-pro-preview", input="think hard about the sky",
    background=True, generation_config={"max_output_tokens": 40})
assert i.status == "in_progress", i.status
polls = 0
while i.status == "in_progress":
    time.sleep(0.05)
    i = c.interactions.get(id=i.id)
    polls += 1
assert polls == 2 and i.status == "completed" and i.usage.total_output_tokens == 40, (polls, i)
x = c.interactions.create(model="gemini-3-pro-preview", input="never mind", background=True)
y = c.interactions.cancel(id=x.id)
assert y.status == "cancelled", y.status
"#,
        ),
        "python google-genai background interactions",
    );
    let reported = w.fake.reported();
    assert_eq!(reported.len(), 1, "{reported:#?}");
    let rows = w.agent.wait_for_records(2);
    assert_eq!(
        rows.len(),
        2,
        "one row per background interaction: {rows:#?}"
    );
    tollgate_e2e::world::assert_row_matches(&rows[0], &reported[0]);
    assert_eq!(s(&rows[0], "operation"), "interaction", "{}", rows[0]);
    assert!(rows[0]["cost_usd"].as_f64().is_some_and(|c| c > 0.0));
    assert_eq!(s(&rows[1], "error"), "response_cancelled", "{}", rows[1]);
    assert_eq!(rows[1]["estimated"], true, "{}", rows[1]);
    assert_no_secret(&w, "FAKE-GEMINI-BACKGROUND");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn claude_managed_agents_sessions_are_recorded_as_they_grow() {
    // The loop runs at Anthropic: what the job sees is each session's
    // cumulative usage. Each growth the agent sees is one row; repeated
    // polls add nothing; the rows add up to the session's own total.
    let mut w = World::start("managed-agents", 48);
    let client = w.client(&[]);
    let out = ok(
        &client.python(
            r#"
import json, anthropic
c = anthropic.Anthropic(api_key="sk-ant-FAKE-SESSIONS-SECRET", max_retries=0)
s = c.beta.sessions.create(agent="agent_fake", environment_id="env_fake")
assert s.usage.input_tokens == 0, s.usage
msg = lambda t: [{"type": "user.message", "content": [{"type": "text", "text": t}]}]
c.beta.sessions.events.send(s.id, events=msg("review this diff please"))
first = c.beta.sessions.retrieve(s.id)
again = c.beta.sessions.retrieve(s.id)
assert first.usage.output_tokens == again.usage.output_tokens == 250
c.beta.sessions.events.send(s.id, events=msg("and the tests"))
events = list(c.beta.sessions.events.list(s.id))
assert any(e.type == "session.usage" for e in events), events
final = c.beta.sessions.retrieve(s.id)
print(json.dumps(final.usage.model_dump(mode="json")))
"#,
        ),
        "python anthropic managed agents sessions",
    );
    let total: Value = serde_json::from_str(out.trim()).unwrap();
    let rows = w.agent.wait_for_records(2);
    assert_eq!(rows.len(), 2, "one row per growth seen: {rows:#?}");
    let sum = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
    let n = |k: &str| total[k].as_u64().unwrap();
    let written = total["cache_creation"]["ephemeral_5m_input_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(
        sum("input_tokens"),
        n("input_tokens") + n("cache_read_input_tokens") + written
    );
    assert_eq!(sum("output_tokens"), n("output_tokens"));
    assert_eq!(sum("cached_input_tokens"), n("cache_read_input_tokens"));
    assert_eq!(sum("cache_write_input_tokens"), written);
    for r in &rows {
        assert_eq!(s(r, "operation"), "agent_session", "{r}");
        assert_eq!(s(r, "provider"), "anthropic", "{r}");
        assert_eq!(s(r, "model"), "claude-opus-4-6", "{r}");
        assert!(r["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    }
    // Nothing more: stopped, the agent has written every record.
    let status = w.agent.terminate().expect("agent was running");
    assert!(status.success(), "{status}; log:\n{}", w.agent.log());
    let rows = w.agent.report_json();
    assert_eq!(rows.len(), 2, "nothing more: {rows:#?}");
    assert_no_secret(&w, "FAKE-SESSIONS-SECRET");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn batch_results_are_recorded_once_per_model_at_the_batch_rates() {
    // A batch's submission bills nothing; its results do, at half price.
    // Each SDK submits a batch, waits for it, reads its results twice: the
    // rows are the results' usage per model, once.
    let mut w = World::start("batches", 49);
    let client = w.client(&[]);
    let out = ok(
        &client.python(
            r#"
import io, json, openai, anthropic
from google import genai
from google.genai import types
seen = {}
def saw(provider, model, i, o):
    k = provider + " " + model
    a = seen.setdefault(k, [0, 0])
    a[0] += i; a[1] += o

o = openai.OpenAI(api_key="sk-FAKE-BATCH-SECRET-OPENAI", max_retries=0)
lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
    "body": {"model": m, "max_tokens": n, "messages": [{"role": "user", "content": "summarise item " + cid}]}})
    for cid, m, n in [("r1", "gpt-4o-mini", 5), ("r2", "gpt-4o", 7), ("bad3", "gpt-4o", 9), ("r4", "gpt-4o-mini", 11)]]
f = o.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
b = o.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
b = o.batches.retrieve(b.id)
assert b.status == "completed", b.status
text = o.files.content(b.output_file_id).text
assert o.files.content(b.output_file_id).text == text
for line in text.splitlines():
    r = json.loads(line)["response"]
    if r["status_code"] == 200:
        saw("openai", r["body"]["model"], r["body"]["usage"]["prompt_tokens"], r["body"]["usage"]["completion_tokens"])

a = anthropic.Anthropic(api_key="sk-ant-FAKE-BATCH-SECRET-ANTHROPIC", max_retries=0)
msg = lambda t: [{"role": "user", "content": t}]
mb = a.messages.batches.create(requests=[
    {"custom_id": "a1", "params": {"model": "claude-sonnet-4-5", "max_tokens": 6, "messages": msg("review this diff")}},
    {"custom_id": "bad2", "params": {"model": "claude-sonnet-4-5", "max_tokens": 6, "messages": msg("x")}},
    {"custom_id": "a3", "params": {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": msg("and these tests please")}},
])
mb = a.messages.batches.retrieve(mb.id)
assert mb.processing_status == "ended", mb
results = list(a.messages.batches.results(mb.id))
assert len(list(a.messages.batches.results(mb.id))) == len(results) == 3
for r in results:
    if r.result.type == "succeeded":
        saw("anthropic", r.result.message.model, r.result.message.usage.input_tokens, r.result.message.usage.output_tokens)

g = genai.Client(api_key="AIzaSyFAKE-BATCH-SECRET-GEMINI")
job = g.batches.create(model="gemini-2.5-flash", src=[
    {"contents": [{"parts": [{"text": "why is the sky blue"}], "role": "user"}],
     "config": {"max_output_tokens": 12}, "metadata": {"key": "g1"}},
    {"contents": [{"parts": [{"text": "nope"}], "role": "user"}], "metadata": {"key": "bad2"}},
])
job = g.batches.get(name=job.name)
assert job.state == "JOB_STATE_SUCCEEDED", job.state
for r in job.dest.inlined_responses:
    if r.response is not None:
        u = r.response.usage_metadata
        saw("gemini", r.response.model_version, u.prompt_token_count, u.candidates_token_count)
assert g.batches.get(name=job.name).state == "JOB_STATE_SUCCEEDED"
# A batch whose responses go to a file, downloaded twice.
fj = g.batches.create(model="gemini-2.5-pro", src=[
    {"contents": [{"parts": [{"text": "explain the build failure"}], "role": "user"}],
     "config": {"max_output_tokens": 9}, "metadata": {"key": "f1"}},
], config={"display_name": "to-file"})
fj = g.batches.get(name=fj.name)
assert fj.dest.file_name, fj
data = g.files.download(file=fj.dest.file_name)
assert g.files.download(file=fj.dest.file_name) == data
for line in data.decode().splitlines():
    r = json.loads(line)["response"]
    saw("gemini", r["modelVersion"], r["usageMetadata"]["promptTokenCount"], r["usageMetadata"]["candidatesTokenCount"])
print(json.dumps(seen))
"#,
        ),
        "python batches with the openai, anthropic and google-genai SDKs",
    );
    let seen: Value = serde_json::from_str(out.trim()).unwrap();
    let seen = seen.as_object().unwrap();
    assert_eq!(seen.len(), 6, "{seen:?}");
    // The submissions (zero-token rows) and the results' rows.
    let want = seen.len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let results = loop {
        let rows: Vec<Value> = w
            .agent
            .report_json()
            .into_iter()
            .filter(|r| s(r, "operation") == "batch_results")
            .collect();
        if rows.len() >= want || std::time::Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(results.len(), want, "one row per model: {results:#?}");
    for r in &results {
        let key = format!("{} {}", s(r, "provider"), s(r, "model"));
        let counts = &seen[&key];
        assert_eq!(r["input_tokens"], counts[0], "{key}: {r}");
        assert_eq!(r["output_tokens"], counts[1], "{key}: {r}");
        assert_eq!(s(r, "service_tier"), "batch", "{r}");
        assert_eq!(r["estimated"], false, "{r}");
        assert!(r["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    }
    // Half the standard rate: gpt-4o is $2.50 / $10 per million.
    let gpt4o = results.iter().find(|r| s(r, "model") == "gpt-4o").unwrap();
    let (i, o) = (
        gpt4o["input_tokens"].as_f64().unwrap(),
        gpt4o["output_tokens"].as_f64().unwrap(),
    );
    let half = (i * 2.5 + o * 10.0) / 2e6;
    assert!(
        (gpt4o["cost_usd"].as_f64().unwrap() - half).abs() < 1e-12,
        "{gpt4o}"
    );
    let all = w.agent.report_json();
    for op in ["file_upload", "batch"] {
        assert!(
            all.iter().any(|r| s(r, "operation") == op),
            "the {op} row: {all:#?}"
        );
    }
    // Stopped, the agent has written every record.
    let status = w.agent.terminate().expect("agent was running");
    assert!(status.success(), "{status}; log:\n{}", w.agent.log());
    let again = w
        .agent
        .report_json()
        .into_iter()
        .filter(|r| s(r, "operation") == "batch_results")
        .count();
    assert_eq!(again, want, "the second reads added nothing");
    assert_no_secret(&w, "FAKE-BATCH-SECRET");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn openai_evals_runs_are_recorded_as_they_grow() {
    // An Evals run samples and grades at OpenAI: what the job sees is the
    // run's usage per model. Each growth the agent sees is a row; the rows
    // add up to the run's own totals, per model.
    let mut w = World::start("evals", 50);
    let client = w.client(&[]);
    let out = ok(
        &client.python(
            r#"
import json, openai
c = openai.OpenAI(api_key="sk-FAKE-EVALS-SECRET", max_retries=0)
run = c.evals.runs.create("eval_fake", name="nightly",
    data_source={"type": "jsonl", "source": {"type": "file_content", "content": [{"item": {"q": "2+2"}}]}})
assert run.status == "queued", run.status
first = c.evals.runs.retrieve(run.id, eval_id="eval_fake")
assert first.status == "in_progress", first.status
done = c.evals.runs.retrieve(run.id, eval_id="eval_fake")
assert done.status == "completed", done.status
again = c.evals.runs.retrieve(run.id, eval_id="eval_fake")
listed = list(c.evals.runs.list("eval_fake"))
assert any(r.id == run.id for r in listed), listed
assert c.evals.runs.cancel(run.id, eval_id="eval_fake").status == "canceled"
print(json.dumps({u.run_model_name: [u.prompt_tokens, u.completion_tokens, u.cached_tokens]
    for u in again.per_model_usage}))
"#,
        ),
        "python openai evals runs",
    );
    let totals: Value = serde_json::from_str(out.trim()).unwrap();
    let totals = totals.as_object().unwrap();
    assert_eq!(totals.len(), 2, "{totals:?}");
    // gpt-4o-mini grew twice (in progress, completed), o3-mini once.
    let rows = w.agent.wait_for_records(3);
    assert_eq!(rows.len(), 3, "one row per growth seen: {rows:#?}");
    for (model, t) in totals {
        let mine: Vec<&Value> = rows.iter().filter(|r| s(r, "model") == model).collect();
        let sum = |k: &str| mine.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
        assert_eq!(sum("input_tokens"), t[0], "{model}");
        assert_eq!(sum("output_tokens"), t[1], "{model}");
        assert_eq!(sum("cached_input_tokens"), t[2], "{model}");
    }
    for r in &rows {
        assert_eq!(s(r, "operation"), "eval_run", "{r}");
        assert_eq!(s(r, "provider"), "openai", "{r}");
        assert!(r["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    }
    // Nothing more: stopped, the agent has written every record.
    let status = w.agent.terminate().expect("agent was running");
    assert!(status.success(), "{status}; log:\n{}", w.agent.log());
    let rows = w.agent.report_json();
    assert_eq!(rows.len(), 3, "nothing more: {rows:#?}");
    assert_no_secret(&w, "FAKE-EVALS-SECRET");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn google_genai_python_sdk_on_vertex_ai() {
    // Gemini on Vertex AI, a region configured as a Gemini provider host
    // (as the README says): the project/location/publisher paths are read.
    // A per-token price the config gives a per-character model is used
    // (the catalogue's Gemini API prices are not).
    let w = World::start_with(
        "vertex",
        39,
        "[[pricing.models]]\nprovider = \"gemini\"\nmodel = \"text-embedding-005\"\ninput = 0.5\noutput = 0.0\n"
            .to_string(),
    );
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
from google import genai
from google.genai import types
from google.oauth2.credentials import Credentials
c = genai.Client(vertexai=True, project="acme-ci", location="us-central1",
    credentials=Credentials(token="ya29.FAKE-VERTEX-TOKEN"))
r = c.models.generate_content(model="gemini-2.5-flash", contents="why is the sky blue",
    config=types.GenerateContentConfig(max_output_tokens=8))
assert r.usage_metadata.candidates_token_count == 8, r.usage_metadata
n = 0
for ch in c.models.generate_content_stream(model="gemini-2.5-pro", contents="count to five",
        config=types.GenerateContentConfig(max_output_tokens=5)):
    n += 1
assert n == 5, n
# Vertex AI's OpenAI-compatible endpoint, as the OpenAI SDK (or LiteLLM)
# calls it.
import openai
o = openai.OpenAI(api_key="ya29.FAKE-VERTEX-TOKEN", max_retries=0,
    base_url="https://us-central1-aiplatform.googleapis.com/v1/projects/acme-ci/locations/us-central1/endpoints/openapi")
r = o.chat.completions.create(model="google/gemini-2.5-flash", max_tokens=4,
    messages=[{"role": "user", "content": "hello there"}])
assert r.usage.completion_tokens == 4, r.usage
# A text embedding model: the SDK calls `:predict` with one instance per
# text (Gemini embedding models take `:embedContent` there instead).
e = c.models.embed_content(model="text-embedding-005",
    contents=["why is the sky blue", "because of Rayleigh scattering"])
assert len(e.embeddings) == 2, e
assert [x.statistics.token_count for x in e.embeddings] == [11, 9], e
# The Gemini API's text-embedding-004 is free there; on Vertex it is not.
e = c.models.embed_content(model="text-embedding-004", contents=["hello there"])
assert e.embeddings[0].statistics.token_count == 5, e
"#,
        ),
        "python google-genai on Vertex AI",
    );
    let mut rows = w.assert_ledger_matches_provider(5);
    // The provider's own counts, summed over the instances; the config's
    // price, and none from the catalogue (Vertex prices these models per
    // character): not even the Gemini API's $0 for text-embedding-004.
    let free_there = rows.pop().unwrap();
    let embed = rows.pop().unwrap();
    assert_eq!(s(&embed, "operation"), "embeddings", "{embed}");
    assert_eq!(s(&embed, "model"), "text-embedding-005", "{embed}");
    assert_eq!(embed["input_tokens"], 20, "{embed}");
    assert_eq!(embed["provider"], "gemini", "{embed}");
    assert!(
        (embed["cost_usd"].as_f64().unwrap() - 20.0 * 0.5 / 1e6).abs() < 1e-12,
        "{embed}"
    );
    assert!(free_there["cost_usd"].is_null(), "{free_there}");
    assert_eq!(
        s(&free_there, "model"),
        "text-embedding-004",
        "{free_there}"
    );
    for r in &rows {
        assert_eq!(s(r, "provider"), "gemini", "{r}");
        assert_eq!(s(r, "host"), tollgate_e2e::world::VERTEX_HOST, "{r}");
        assert!(r["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    }
    let reported = w.fake.reported();
    let paths: Vec<&str> = reported.iter().map(|r| r.path.as_str()).collect();
    assert!(
        paths[..2].iter().all(
            |p| p.contains("/projects/acme-ci/locations/us-central1/publishers/google/models/")
        ),
        "{paths:?}"
    );
    assert!(
        paths[2].ends_with("/endpoints/openapi/chat/completions"),
        "{paths:?}"
    );
    // Priced (above) as the Gemini API's model; the names as sent.
    assert_eq!(
        s(&rows[2], "model"),
        "google/gemini-2.5-flash",
        "{}",
        rows[2]
    );
    assert_eq!(
        s(&rows[2], "response_model"),
        "google/gemini-2.5-flash",
        "{}",
        rows[2]
    );
    assert_no_secret(&w, "FAKE-VERTEX-TOKEN");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn anthropic_python_sdk_on_vertex_ai() {
    // Claude on Vertex AI (Claude Code's CLAUDE_CODE_USE_VERTEX): the
    // Messages API on a Vertex region configured as a Gemini host, the
    // model in the URL. Recorded as Anthropic's, at Anthropic's prices.
    let w = World::start("vertex-claude", 40);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
from anthropic import AnthropicVertex
c = AnthropicVertex(region="us-central1", project_id="acme-ci",
    access_token="ya29.FAKE-VERTEX-CLAUDE-TOKEN", max_retries=0)
m = c.messages.create(model="claude-sonnet-4-5@20250929", max_tokens=9,
    messages=[{"role": "user", "content": "one two three"}])
assert m.usage.output_tokens == 9, m.usage
with c.messages.stream(model="claude-sonnet-4-5@20250929", max_tokens=6,
        messages=[{"role": "user", "content": "four five"}]) as s:
    text = "".join(s.text_stream)
assert s.get_final_message().usage.output_tokens == 6
# The first request again, through the global location (here on the same
# host: the location in the path is what Vertex prices by).
g = AnthropicVertex(region="global", project_id="acme-ci", max_retries=0,
    access_token="ya29.FAKE-VERTEX-CLAUDE-TOKEN",
    base_url="https://us-central1-aiplatform.googleapis.com/v1")
m = g.messages.create(model="claude-sonnet-4-5@20250929", max_tokens=9,
    messages=[{"role": "user", "content": "one two three"}])
assert m.usage.output_tokens == 9, m.usage
"#,
        ),
        "python anthropic on Vertex AI",
    );
    let rows = w.assert_ledger_matches_provider(3);
    // Claude Sonnet 4.5 and later cost 10 % more through a regional
    // location than through the global one, the same tokens otherwise.
    let cost = |r: &Value| r["cost_usd"].as_f64().unwrap();
    assert_eq!(rows[0]["input_tokens"], rows[2]["input_tokens"]);
    assert_eq!(rows[0]["output_tokens"], rows[2]["output_tokens"]);
    assert!(
        (cost(&rows[0]) / cost(&rows[2]) - 1.1).abs() < 1e-9,
        "regional {} vs global {}",
        rows[0],
        rows[2]
    );
    assert!(
        s(&rows[2], "path").contains("/locations/global/"),
        "{}",
        rows[2]
    );
    for r in &rows {
        assert_eq!(s(r, "provider"), "anthropic", "{r}");
        assert_eq!(s(r, "host"), tollgate_e2e::world::VERTEX_HOST, "{r}");
        assert!(s(r, "model").starts_with("claude-sonnet-4-5"), "{r}");
        assert!(r["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    }
    assert_eq!(rows.iter().filter(|r| r["streaming"] == true).count(), 1);
    let reported = w.fake.reported();
    assert!(
        reported.iter().all(|r| r
            .path
            .contains("/publishers/anthropic/models/claude-sonnet-4-5@20250929:")),
        "{reported:?}"
    );
    assert_no_secret(&w, "FAKE-VERTEX-CLAUDE-TOKEN");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn gemini_key_query_parameter_and_json_array_stream_via_curl() {
    let w = World::start("gemkey", 15);
    let client = w.client(&[]);
    let body = r#"{"contents":[{"parts":[{"text":"a b c d e"}]}],"generationConfig":{"maxOutputTokens":4}}"#;
    for path in [
        "v1beta/models/gemini-2.0-flash:generateContent?key=AIzaQUERYSECRET",
        "v1beta/models/gemini-2.0-flash:streamGenerateContent?key=AIzaQUERYSECRET",
    ] {
        ok(
            &client.run(&[
                "curl",
                "-sS",
                "--fail-with-body",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
                &format!("https://generativelanguage.googleapis.com/{path}"),
            ]),
            "curl gemini",
        );
    }
    w.assert_ledger_matches_provider(2);
    assert_no_secret(&w, "QUERYSECRET");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn boto3_bedrock_converse_stream_and_invoke() {
    let w = World::start("bedrock", 16);
    let client = w.client(&[
        ("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKEFAKE"),
        ("AWS_SECRET_ACCESS_KEY", "fake/BEDROCKSECRET/key"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]);
    ok(
        &client.python(
            r#"
import json, boto3
b = boto3.client("bedrock-runtime", region_name="us-east-1")
mid = "anthropic.claude-3-5-sonnet-20240620-v1:0"
r = b.converse(modelId=mid, messages=[{"role": "user", "content": [{"text": "hi there bedrock"}]}],
    inferenceConfig={"maxTokens": 6})
assert r["usage"]["outputTokens"] == 6, r["usage"]
s = b.converse_stream(modelId=mid, messages=[{"role": "user", "content": [{"text": "stream it"}]}],
    inferenceConfig={"maxTokens": 4})
usage = None
for ev in s["stream"]:
    if "metadata" in ev:
        usage = ev["metadata"]["usage"]
assert usage and usage["outputTokens"] == 4, usage
r = b.invoke_model(modelId=mid, body=json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 3,
    "messages": [{"role": "user", "content": "invoke me"}]}))
assert json.loads(r["body"].read())["usage"]["output_tokens"] == 3
# Claude 4.5 through a geographic profile, then through global inference.
for prefix in ["us", "global"]:
    b.converse(modelId=prefix + ".anthropic.claude-sonnet-4-5-20250929-v1:0",
        messages=[{"role": "user", "content": [{"text": "same words each time"}]}],
        inferenceConfig={"maxTokens": 8})
"#,
        ),
        "python boto3",
    );
    let rows = w.assert_ledger_matches_provider(5);
    assert_eq!(s(&rows[0], "provider"), "bedrock");
    assert_eq!(rows[1]["streaming"], true);
    // The same counts; the regional endpoint costs a tenth more.
    let (us, global) = (&rows[3], &rows[4]);
    assert_eq!(
        (&us["input_tokens"], &us["output_tokens"]),
        (&global["input_tokens"], &global["output_tokens"])
    );
    let cost = |r: &serde_json::Value| r["cost_usd"].as_f64().expect("priced");
    assert!(
        (cost(us) - 1.1 * cost(global)).abs() < 1e-12,
        "{} vs {}",
        cost(us),
        cost(global)
    );
    assert_no_secret(&w, "BEDROCKSECRET");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn node_openai_and_anthropic_sdks() {
    let w = World::start("node", 17);
    let client = w.client(&[]);
    let out = ok(
        &client.node(
            r#"
const OpenAI = require("openai");
const Anthropic = require("@anthropic-ai/sdk");
(async () => {
  const o = new OpenAI({ apiKey: "sk-node-SECRET", maxRetries: 0 });
  const r = await o.chat.completions.create({ model: "gpt-4o-mini", max_tokens: 5,
    messages: [{ role: "user", content: "node says hi" }] });
  if (r.usage.completion_tokens !== 5) throw new Error(JSON.stringify(r.usage));
  const s = await o.chat.completions.create({ model: "gpt-4o-mini", max_tokens: 4, stream: true,
    messages: [{ role: "user", content: "stream from node" }] });
  let n = 0;
  for await (const ch of s) { if ("usage" in ch) throw new Error("client saw usage"); n++; }
  const a = new Anthropic({ apiKey: "sk-ant-node-SECRET", maxRetries: 0 });
  const st = await a.messages.create({ model: "claude-haiku-4-5", max_tokens: 6, stream: true,
    messages: [{ role: "user", content: "anthropic from node" }] });
  let text = "";
  for await (const ev of st) { if (ev.type === "content_block_delta") text += ev.delta.text; }
  console.log(JSON.stringify({ chunks: n, text }));
})().catch((e) => { console.error(e); process.exit(1); });
"#,
        ),
        "node SDKs",
    );
    let got: Value = serde_json::from_str(out.trim()).expect("node output");
    assert_eq!(got["chunks"], 1 + 4 + 1, "{got}");
    assert_eq!(got["text"], "tok tok tok tok tok tok");
    let rows = w.assert_ledger_matches_provider(3);
    assert!(s(&rows[0], "exe").contains("node"), "{}", rows[0]);
    assert_no_secret(&w, "node-SECRET");
}

/// The Node SDK's Realtime client (`OpenAIRealtimeWS`, on the `ws`
/// package): each response on the socket is a record with the provider's
/// usage.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn node_openai_realtime_over_a_websocket() {
    let w = World::start("node-realtime", 61);
    let client = w.client(&[]);
    let out = ok(
        &client.node(
            r#"
const OpenAI = require("openai");
const { OpenAIRealtimeWS } = require("openai/realtime/ws");
(async () => {
  const client = new OpenAI({ apiKey: "sk-node-RTSECRET", maxRetries: 0 });
  const rt = await OpenAIRealtimeWS.create(client, { model: "gpt-realtime" });
  const inputs = [];
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no answer in 60 s")), 60000);
    rt.on("error", (e) => reject(e));
    rt.socket.on("error", (e) => reject(e));
    rt.socket.on("open", () => {
      rt.send({ type: "conversation.item.create", item: { type: "message", role: "user",
        content: [{ type: "input_text", text: "hi from node" }] } });
      rt.send({ type: "response.create" });
    });
    rt.on("response.done", (ev) => {
      inputs.push(ev.response.usage.input_tokens);
      if (inputs.length === 2) { clearTimeout(timer); resolve(); }
      else rt.send({ type: "response.create" });
    });
  });
  rt.close();
  console.log(JSON.stringify(inputs));
})().catch((e) => { console.error(e); process.exit(1); });
"#,
        ),
        "node openai realtime",
    );
    let got: Value = serde_json::from_str(out.trim()).expect("node output");
    assert_eq!(got, serde_json::json!([910, 1020]), "{got}");
    let rows = w.assert_ledger_matches_provider(2);
    for r in &rows {
        assert_eq!(s(r, "operation"), "realtime", "{r}");
        assert!(s(r, "exe").contains("node"), "{r}");
        assert!(r["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    }
    assert_no_secret(&w, "RTSECRET");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn an_answer_whose_counts_cannot_be_known_has_no_cost_not_a_cost_of_zero() {
    // The body is longer than max_request_body (forwarded, not kept), the
    // answer has no usage and no text: nothing to count or estimate from.
    let w = World::start_with(
        "no-counts",
        34,
        "proxy.max_request_body = 1000\n".to_string(),
    );
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
r = c.chat.completions.create(model="gpt-4o", max_tokens=5,
    extra_headers={"x-fake-no-usage": "1", "x-fake-empty-answer": "1"},
    messages=[{"role": "user", "content": "lorem ipsum " * 400}])
assert r.usage is None and r.choices[0].message.content == ""
"#,
        ),
        "python openai",
    );
    let rows = w.agent.wait_for_records(1);
    let r = &rows[0];
    assert_eq!(r["response_model"], "gpt-4o-2024-07-18", "{r}");
    assert_eq!(
        r["model"],
        serde_json::Value::Null,
        "the body was not read: {r}"
    );
    assert_eq!(r["error"], "usage_missing", "{r}");
    assert_eq!(r["estimated"], false, "{r}");
    assert!(r["cost_usd"].is_null(), "unknown counts, unknown cost: {r}");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn http2_client_through_the_agent() {
    let w = World::start("h2", 18);
    let client = w.client(&[]);
    let out = ok(
        &client.run(&[
            "curl", "-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version}",
            "-H", "Content-Type: application/json",
            "-d", r#"{"model":"gpt-4o","messages":[{"role":"user","content":"h2 please"}],"max_tokens":3,"stream":true}"#,
            "https://api.openai.com/v1/chat/completions",
        ]),
        "curl --http2",
    );
    assert_eq!(out.trim(), "2", "HTTP/2 between client and agent");
    w.assert_ledger_matches_provider(1);

    // 150 streams at once, from two client connections (curl opens at
    // most 100 streams on one): the agent's upstream HTTP/2 connection
    // carries 100, and the rest wait for one more connection instead of
    // each opening their own. Each stream holds after its first chunk
    // until the fake provider has all 150 requests (gate `all`), so they
    // are open at once however slowly curl starts them.
    let before = w.fake.connections();
    let requests_before = w.fake.requests();
    const BURST: usize = 150;
    let all = client.dir().join("all");
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"h2 burst"}],"max_tokens":40,"stream":true}"#;
    let urls = " -o /dev/null https://api.openai.com/v1/chat/completions".repeat(BURST / 2);
    let curl = format!(
        "curl -sS --http2 --parallel --parallel-max 100 -w '%{{http_version}}\\n' \
         -H 'Content-Type: application/json' -H 'x-fake-hold: 1:{}' -d '{body}'{urls}",
        all.display()
    );
    let script = format!("{curl} & a=$!; {curl} & b=$!; wait $a && wait $b");
    let (out, arrived) = std::thread::scope(|sc| {
        let running = sc.spawn(|| client.run(&["sh", "-c", &script]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while w.fake.requests() - requests_before < BURST
            && !running.is_finished()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let arrived = w.fake.requests() - requests_before;
        std::fs::write(&all, "").expect("all");
        (running.join().expect("client thread"), arrived)
    });
    let out = ok(&out, "2 × curl --http2 --parallel");
    assert_eq!(
        arrived, BURST,
        "every stream of the burst reached the provider while all were held open"
    );
    let versions: Vec<&str> = out.lines().collect();
    assert_eq!(versions.len(), BURST, "{out}");
    assert!(versions.iter().all(|v| *v == "2"), "{out}");
    let opened = w.fake.connections() - before;
    assert!(
        (1..=2).contains(&opened),
        "{BURST} concurrent streams opened {opened} upstream connections (expected 1 more next to the pooled one)"
    );
    w.assert_ledger_matches_provider(1 + BURST);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn missing_usage_is_estimated_locally_and_unknown_models_cost_null() {
    let w = World::start("estimate", 19);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
r = c.chat.completions.create(model="gpt-4o", max_tokens=8, extra_headers={"x-fake-no-usage": "1"},
    messages=[{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}])
assert r.usage is None
c.chat.completions.create(model="my-private-finetune", max_tokens=3,
    messages=[{"role": "user", "content": "hello"}])
"#,
        ),
        "python openai",
    );
    let rows = w.agent.wait_for_records(2);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    // The estimate is computed off the async workers, so rows may land in
    // either order.
    let by_model = |m| tollgate_e2e::row_with(&rows, "model", m);
    let est = by_model("gpt-4o");
    assert_eq!(est["estimated"], true, "{est}");
    // "tok tok ... tok" (8 words) is 8 tokens in o200k_base; the prompt is
    // 9 words plus the chat framing.
    assert_eq!(est["output_tokens"], 8, "{est}");
    let input = est["input_tokens"].as_u64().unwrap();
    assert!((9..=20).contains(&input), "{est}");
    assert!(
        est["cost_usd"].as_f64().unwrap() > 0.0,
        "estimated counts are priced: {est}"
    );
    assert!(est["error"].is_null(), "{est}");
    let unknown = by_model("my-private-finetune");
    assert_eq!(unknown["estimated"], false);
    assert!(
        unknown["cost_usd"].is_null(),
        "unknown model has no cost: {unknown}"
    );
    assert_eq!(unknown["output_tokens"], 3);
    // The operator is told once, at warn, which model lacks a price.
    let log = w.agent.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no price for this model") && l.contains("\"WARN\""))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("my-private-finetune"),
        "{}",
        warnings[0]
    );
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn http1_only_upstream_keeps_working_with_a_pool() {
    let w = World::start_opts("h1up", 20, String::new(), &[b"http/1.1"]);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
for i in range(5):
    c.chat.completions.create(model="gpt-4o-mini", max_tokens=i + 1, messages=[{"role": "user", "content": "h1"}])
for _ in c.chat.completions.create(model="gpt-4o-mini", max_tokens=3, stream=True,
        messages=[{"role": "user", "content": "h1 stream"}]):
    pass
"#,
        ),
        "python over an HTTP/1.1 upstream",
    );
    w.assert_ledger_matches_provider(6);
    // Six requests in turn on one client connection: the agent reuses its
    // upstream connection instead of a handshake per request.
    let conns = w.fake.connections();
    assert!(
        (1..=2).contains(&conns),
        "{conns} upstream connections for 6 sequential requests"
    );

    // An HTTP/2 client in front of the same HTTP/1.1-only provider: its
    // requests in turn share one upstream connection too, and a burst of
    // concurrent streams is served (one HTTP/1.1 connection each).
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"h2 to h1"}],"max_tokens":3,"stream":true}"#;
    let url = " -o /dev/null https://api.openai.com/v1/chat/completions";
    let curl = |extra: &str, n: usize| {
        let cmd = format!(
            "curl -sS --http2 {extra} -w '%{{http_version}}\\n' -H 'Content-Type: application/json' -H 'x-fake-chunk-delay-ms: 20' -d '{body}'{}",
            url.repeat(n)
        );
        let out = ok(&client.run(&["sh", "-c", &cmd]), "curl --http2");
        let versions: Vec<String> = out.lines().map(str::to_string).collect();
        assert_eq!(versions.len(), n, "{out}");
        assert!(versions.iter().all(|v| v == "2"), "{out}");
    };
    let before = w.fake.connections();
    curl("", 5);
    let opened = w.fake.connections() - before;
    assert!(
        (1..=2).contains(&opened),
        "{opened} upstream connections for 5 sequential HTTP/2 requests to an HTTP/1.1 provider"
    );
    curl("--parallel --parallel-max 20", 20);
    w.assert_ledger_matches_provider(6 + 5 + 20);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn azure_openai_python_sdk_deployments_and_stream_usage_by_api_version() {
    let w = World::start("azure", 24);
    let client = w.client(&[]);
    let out = ok(
        &client.python(
            r#"
import json, openai
def azure(version):
    return openai.AzureOpenAI(azure_endpoint="https://myres.openai.azure.com",
        api_key="az-secret-9f3kq", api_version=version, max_retries=0)
c = azure("2024-10-21")
r = c.chat.completions.create(model="gpt-4o-mini", max_tokens=5,
    messages=[{"role": "user", "content": "a b c"}])
assert r.usage.completion_tokens == 5, r.usage
chunks = list(c.chat.completions.create(model="gpt-4o-mini", max_tokens=6, stream=True,
    messages=[{"role": "user", "content": "d e f g"}]))
# 2024-06-01 refuses stream_options: the agent must not add it.
old = list(azure("2024-06-01").chat.completions.create(model="gpt-4o-mini", max_tokens=4,
    stream=True, messages=[{"role": "user", "content": "h i"}]))
print(json.dumps([[ch.usage is not None for ch in chunks], len(chunks), len(old)]))
"#,
        ),
        "python openai.AzureOpenAI",
    );
    let (usage_seen, n, n_old): (Vec<bool>, usize, usize) =
        serde_json::from_str(out.trim()).expect("client output");
    assert!(
        usage_seen.iter().all(|u| !u),
        "the client did not ask for usage and saw none"
    );
    assert_eq!(n, 1 + 6 + 1, "role chunk, 6 tokens, stop chunk");
    assert_eq!(n_old, 1 + 4 + 1);

    let reported = w.fake.reported();
    assert_eq!(reported.len(), 3, "{reported:#?}");
    for rep in &reported {
        assert_eq!(rep.sni, "myres.openai.azure.com");
        assert!(
            rep.path
                .starts_with("/openai/deployments/gpt-4o-mini/chat/completions"),
            "{rep:?}"
        );
    }
    assert!(reported[1].usage_sent, "include_usage added for 2024-10-21");
    assert!(
        !reported[2].usage_sent,
        "stream_options not sent to 2024-06-01"
    );

    let rows = w.agent.wait_for_records(3);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    // The estimate is computed off the async workers, so the old version's
    // row may land before the others.
    let (estimated, counted): (Vec<&Value>, Vec<&Value>) =
        rows.iter().partition(|r| r["estimated"] == true);
    assert_eq!(estimated.len(), 1, "{rows:#?}");
    let mut counted = counted;
    counted.sort_by_key(|r| r["streaming"] == true);
    for (row, rep) in counted.iter().zip(&reported[..2]) {
        tollgate_e2e::world::assert_row_matches(row, rep);
        assert_eq!(s(row, "provider"), "azure-openai", "{row}");
    }
    let est = estimated[0];
    assert_eq!(s(est, "provider"), "azure-openai", "{est}");
    assert_eq!(est["streaming"], true, "{est}");
    assert_eq!(
        est["output_tokens"], reported[2].output_tokens,
        "estimated from the streamed text: {est}"
    );
    assert_no_secret(&w, "az-secret-9f3kq");
}
