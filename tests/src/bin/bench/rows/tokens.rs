//! Row 6: local token counting. tollgate's counter
//! (`tollgate::meter::estimate::count_tokens`: tollgate's regex-free
//! pre-tokeniser and merge over tiktoken-rs's ranks) against
//! Python `tiktoken` (`encode_ordinary`, the same no-special-tokens
//! semantics) on the same text, o200k_base (gpt-4o) and cl100k_base
//! (gpt-4). Python tiktoken would download its rank files at run time; it
//! is given the files shipped inside the tiktoken-rs crate instead (through
//! TIKTOKEN_CACHE_DIR, under the name tiktoken derives from the download
//! URL; tiktoken checks their SHA-256, so both use identical ranks).
//!
//! Repetitions alternate Rust, Python, Rust, ...; each side times only the
//! encode call. The text stays under tollgate's exact-count limit
//! (`EXACT_BYTES`, 1 MiB), beyond which it extrapolates by design.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::Row;
use crate::env::Env;
use crate::report::{Figure, Goal};
use crate::stats::median;

pub struct Tokens;

const SCRIPT: &str = r#"
import hashlib, json, os, shutil, sys, time
text_path, assets, cache = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(cache, exist_ok=True)
for name in ("o200k_base", "cl100k_base"):
    url = "https://openaipublic.blob.core.windows.net/encodings/%s.tiktoken" % name
    shutil.copyfile(os.path.join(assets, name + ".tiktoken"), os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
os.environ["TIKTOKEN_CACHE_DIR"] = cache
import tiktoken
text = open(text_path, encoding="utf-8").read()
enc = None
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "load":
        enc = tiktoken.get_encoding(cmd[1])
        enc.encode_ordinary(text[:20000])
        print(json.dumps({"loaded": cmd[1], "version": tiktoken.__version__}), flush=True)
    elif cmd[0] == "count":
        t = time.perf_counter()
        n = len(enc.encode_ordinary(text))
        print(json.dumps({"tokens": n, "secs": time.perf_counter() - t}), flush=True)
"#;

impl Row for Tokens {
    fn id(&self) -> &'static str {
        "tokens"
    }

    fn title(&self) -> &'static str {
        "token counting vs Python tiktoken"
    }

    fn run(&self, env: &mut Env) -> Result<Vec<Figure>> {
        let encodings = [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")];
        let python = crate::peers::venv_root().join("litellm/bin/python");
        let unavailable = if !python.exists() {
            Some(format!(
                "{} is missing (cargo xtask bench installs tiktoken there)",
                python.display()
            ))
        } else {
            None
        };
        let assets = match tiktoken_assets() {
            Ok(a) => a,
            Err(e) => return Ok(skipped(&encodings, &format!("{e:#}"))),
        };
        if let Some(why) = unavailable {
            return Ok(skipped(&encodings, &why));
        }
        let (bytes, reps) = if env.quick {
            (256 << 10, 3)
        } else {
            (1_000_000, 7)
        };
        let text = corpus(bytes);
        let text_path = env.scratch("corpus.txt");
        std::fs::write(&text_path, &text)?;
        let cache = env.scratch("tiktoken-cache");
        let mut cmd = Command::new(&python);
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg(&text_path)
            .arg(&assets)
            .arg(&cache)
            .env_remove("TIKTOKEN_CACHE_DIR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut py = crate::env::spawn_in(&mut cmd, &env.procs)?;
        let mut stdin = py.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(py.stdout.take().context("stdout")?);
        let mut ask = |cmd: &str| -> Result<Value> {
            writeln!(stdin, "{cmd}")?;
            stdin.flush()?;
            let mut line = String::new();
            stdout.read_line(&mut line)?;
            serde_json::from_str(&line).with_context(|| format!("python tiktoken said {line:?}"))
        };
        let mut figs = Vec::new();
        let mb = text.len() as f64 / 1e6;
        let mut version = String::new();
        for (model, name) in encodings {
            let loaded = match ask(&format!("load {name}")) {
                Ok(v) => v,
                Err(e) => {
                    let _ = py.kill();
                    let mut err = String::new();
                    if let Some(mut s) = py.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut s, &mut err);
                    }
                    let _ = py.wait();
                    bail!(
                        "python tiktoken: {e:#}\n{}",
                        err.lines().rev().take(8).collect::<Vec<_>>().join("\n")
                    );
                }
            };
            version = loaded["version"].as_str().unwrap_or("").to_string();
            tollgate::meter::estimate::count_tokens(Some(model), &text[..20_000]);
            let (mut rs_t, mut py_t) = (Vec::new(), Vec::new());
            let (mut rs_n, mut py_n) = (0, 0);
            for _ in 0..reps {
                let t = Instant::now();
                rs_n = tollgate::meter::estimate::count_tokens(Some(model), &text);
                rs_t.push(t.elapsed().as_secs_f64());
                let v = ask("count")?;
                py_n = v["tokens"].as_u64().context("tokens")?;
                py_t.push(v["secs"].as_f64().context("secs")?);
            }
            let (rs, pyr) = (mb / median(&rs_t), mb / median(&py_t));
            figs.push(
                Figure::goal(
                    format!("{name}: |tollgate − tiktoken| tokens"),
                    rs_n.abs_diff(py_n) as f64,
                    "tokens",
                    Goal::AtMost(0.0),
                )
                .note(format!("tollgate {rs_n}, tiktoken {py_n} on {:.2} MB", mb)),
            );
            figs.push(
                Figure::goal(
                    format!("{name}: tollgate speed ÷ tiktoken"),
                    rs / pyr,
                    "x",
                    Goal::AtLeast(1.0),
                )
                .note(format!(
                    "tollgate {rs:.1} MB/s, tiktoken {pyr:.1} MB/s (median of {reps})"
                )),
            );
        }
        let _ = py.kill();
        let _ = py.wait();
        env.note(format!(
            "tokens: python tiktoken {version} with the rank files of tiktoken-rs at {}",
            assets.display()
        ));
        Ok(figs)
    }
}

fn skipped(encodings: &[(&str, &str)], why: &str) -> Vec<Figure> {
    encodings
        .iter()
        .flat_map(|(_, name)| {
            [
                Figure::skipped(
                    format!("{name}: |tollgate − tiktoken| tokens"),
                    "tokens",
                    Some(Goal::AtMost(0.0)),
                    why,
                ),
                Figure::skipped(
                    format!("{name}: tollgate speed ÷ tiktoken"),
                    "x",
                    Some(Goal::AtLeast(1.0)),
                    why,
                ),
            ]
        })
        .collect()
}

/// The `assets/` folder of the tiktoken-rs 0.12 crate in cargo's registry.
fn tiktoken_assets() -> Result<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let mut found = Vec::new();
    for reg in std::fs::read_dir(home.join("registry/src"))?.flatten() {
        for krate in std::fs::read_dir(reg.path())?.flatten() {
            let name = krate.file_name().to_string_lossy().to_string();
            if name.starts_with("tiktoken-rs-0.12")
                && krate.path().join("assets/o200k_base.tiktoken").exists()
            {
                found.push(krate.path().join("assets"));
            }
        }
    }
    found.sort();
    found.pop().with_context(|| {
        format!(
            "no tiktoken-rs-0.12*/assets under {}",
            home.join("registry/src").display()
        )
    })
}

/// Deterministic text of about `bytes` bytes that looks like what CI jobs
/// send: prose, code, JSON, numbers, and some non-ASCII.
pub fn corpus(bytes: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "test",
        "fails",
        "because",
        "parse",
        "returns",
        "an",
        "empty",
        "list",
        "when",
        "input",
        "is",
        "missing",
        "review",
        "this",
        "change",
        "please",
        "and",
        "explain",
        "why",
        "function",
        "value",
        "error",
        "should",
        "handle",
        "case",
        "configuration",
        "pipeline",
        "deploy",
        "request",
        "response",
        "token",
        "budget",
        "unexpected",
        "behaviour",
        "refactor",
        "module",
        "dependency",
        "version",
        "upgrade",
    ];
    const EXTRA: &[&str] = &[
        "naïve café résumé",
        "数据处理 管道",
        "Привет, мир",
        "🚀 shipped",
        "größer als",
        "東京 2024年",
    ];
    let mut s = String::with_capacity(bytes + 256);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    while s.len() < bytes {
        match next(10) {
            0..=5 => {
                let n = 5 + next(20);
                for i in 0..n {
                    let w = WORDS[next(WORDS.len())];
                    if i == 0 {
                        let mut c = w.chars();
                        if let Some(f) = c.next() {
                            s.extend(f.to_uppercase());
                            s.push_str(c.as_str());
                        }
                    } else {
                        s.push(' ');
                        s.push_str(w);
                    }
                    if next(12) == 0 {
                        s.push(',');
                    }
                }
                s.push_str(if next(5) == 0 { "?\n" } else { ". " });
            }
            6 | 7 => {
                let f = WORDS[next(WORDS.len())];
                let a = WORDS[next(WORDS.len())];
                s.push_str(&format!(
                    "\n    fn {f}_{a}(x: u32, y: &str) -> Result<Vec<u8>, Error> {{\n        let {a} = x.wrapping_mul({});\n        Ok(y.as_bytes().to_vec())\n    }}\n",
                    next(100_000)
                ));
            }
            8 => {
                s.push_str(&format!(
                    "{{\"id\": {}, \"name\": \"{}\", \"ok\": {}, \"ratio\": {}.{}}}\n",
                    next(1_000_000),
                    WORDS[next(WORDS.len())],
                    next(2) == 0,
                    next(100),
                    next(1000)
                ));
            }
            _ => {
                s.push_str(EXTRA[next(EXTRA.len())]);
                s.push(' ');
            }
        }
    }
    let mut cut = bytes.min(s.len());
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s
}
