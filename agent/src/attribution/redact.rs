//! Redaction of secrets in command lines, before they are stored or logged.
//!
//! Three rules, applied to each whitespace-separated token:
//! 1. a value after a sensitive name: `--api-key X`, `--token=X`,
//!    `Authorization: Bearer X`, `x-api-key:X`, `OPENAI_API_KEY=X`,
//!    `?key=X&...`, `"api_key": "X"`, `Cookie: a=b; c=d`;
//! 2. the password of a URL's user info (`https://user:X@host`);
//! 3. anything shaped like a provider or forge key (`sk-…`, `AIza…`,
//!    `AKIA…`, `ghp_…`, JWTs, Google OAuth `ya29.…`, AWS session tokens
//!    `IQoJ…`, …) wherever it appears, and a whole argument of 32 or more
//!    hexadecimal digits (Azure keys; commit ids go too);
//! 4. the password of `-u user:PASSWORD` / `--user user:PASSWORD` (curl);
//! 5. a whole argument that looks random: 24 or more characters of
//!    base64 or base64url, mixing upper and lower case and digits the way
//!    random text does (a key passed positionally, as in `aws configure
//!    set aws_secret_access_key X` or `deploy.sh $TOKEN`), where camelCase
//!    names, model ids and branch names change class only at word
//!    boundaries. Not caught: such keys in one case only (lower-case hex
//!    under 32 digits, UUIDs), ones with `.` (Azure AD client secrets),
//!    and about 1 in 26 random base62 keys of 24 characters (1 in 240 at
//!    40; base64 with `+` and `/`: 1 in 10 and 1 in 200).
//!
//! It errs towards redacting too much: a flag such as `--key-file PATH` loses
//! its path. Counts such as `--max-tokens 100` are kept.

/// What replaces a secret.
pub const REDACTED: &str = "[REDACTED]";

/// Words that make a name sensitive when they are one of its parts
/// (split on `-`, `_`, `.`).
const SENSITIVE_WORDS: &[&str] = &[
    "key",
    "apikey",
    "token",
    "password",
    "passwd",
    "pwd",
    "pass",
    "secret",
    "auth",
    "authorization",
    "credential",
    "credentials",
    "bearer",
    "cookie",
    "signature",
];

/// Names sensitive only as a whole: `sig` (Azure Storage SAS URLs,
/// `...&sig=...`), not `--sig-proxy`.
const SENSITIVE_NAMES: &[&str] = &["sig"];

/// Endings that make a name sensitive once separators are removed
/// (`OPENAIAPIKEY`, `hftoken`, `clientsecret`).
const SENSITIVE_ENDINGS: &[&str] = &[
    "key",
    "token",
    "secret",
    "password",
    "passwd",
    "authorization",
    "credentials",
    "cookie",
];

/// Authorization schemes kept in front of the redacted credential.
const SCHEMES: &[&str] = &[
    "bearer",
    "basic",
    "token",
    "digest",
    "apikey",
    "key",
    "negotiate",
];

/// Key prefixes and the shortest tail that makes them a key.
const KEY_SHAPES: &[(&str, usize)] = &[
    ("sk-", 16),
    ("AIza", 30),
    ("AKIA", 16),
    ("ASIA", 16),
    ("gsk_", 20),
    ("xai-", 20),
    ("pplx-", 20),
    ("nvapi-", 20),
    ("fw_", 20),
    ("r8_", 20),
    ("hf_", 20),
    ("ghp_", 20),
    ("gho_", 20),
    ("ghu_", 20),
    ("ghs_", 20),
    ("ghr_", 20),
    ("github_pat_", 20),
    ("glpat-", 20),
    ("sk_live_", 16),
    ("sk_test_", 16),
    ("rk_live_", 16),
    ("rk_test_", 16),
    ("csk-", 20),
    ("pcsk_", 20),
    ("dop_v1_", 20),
    ("NRAK-", 20),
    ("bkua_", 20),
    ("npm_", 20),
    ("GOCSPX-", 20),
    ("xoxb-", 20),
    ("xoxp-", 20),
    ("eyJ", 20),
    ("ya29.", 20),
    ("IQoJ", 20),
];

/// Prefixes whose keys are letters and digits only: their tail stops at
/// the first `_` or `-`, so that names that merely start with one
/// (`npm_config_update_notifier`, `test_sk_test_key_is_masked`,
/// `hf_hub_download_timeout`) are not keys.
const ALNUM_TAILS: &[&str] = &[
    "gsk_", "xai-", "pplx-", "fw_", "r8_", "hf_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
    "sk_live_", "sk_test_", "rk_live_", "rk_test_", "csk-", "dop_v1_", "NRAK-", "bkua_", "npm_",
];

/// Whether `name` (a flag, header, variable or parameter name) names a secret.
pub(super) fn is_sensitive_name(name: &str) -> bool {
    let lower = name
        .trim_matches(|c| c == '-' || c == '"' || c == '\'')
        .to_ascii_lowercase();
    if lower.is_empty() {
        return false;
    }
    if SENSITIVE_NAMES.contains(&lower.as_str()) {
        return true;
    }
    if lower
        .split(['-', '_', '.'])
        .any(|w| SENSITIVE_WORDS.contains(&w))
    {
        return true;
    }
    let compact: String = lower
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    SENSITIVE_ENDINGS.iter().any(|e| compact.ends_with(e))
}

fn is_auth_name(name: &str) -> bool {
    let l = name
        .trim_matches(|c| c == '-' || c == '"' || c == '\'')
        .to_ascii_lowercase();
    l.ends_with("authorization") || l == "auth"
}

fn is_cookie_name(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with("cookie")
}

fn is_scheme(word: &str) -> bool {
    let w = word.trim_matches(|c| c == '"' || c == '\'');
    SCHEMES.iter().any(|s| w.eq_ignore_ascii_case(s))
}

/// What the next token is, after a sensitive name with no value attached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    /// Redact the next token.
    Value,
    /// An Authorization value: keep a scheme word, then redact.
    Auth,
    /// A Cookie value: redact tokens while they end with `;`.
    Cookie,
}

fn pending_for(name: &str) -> Pending {
    if is_auth_name(name) {
        Pending::Auth
    } else if is_cookie_name(name) {
        Pending::Cookie
    } else {
        Pending::Value
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

fn is_value_end(c: char) -> bool {
    matches!(c, '&' | ';' | ',' | '"' | '\'' | '}' | ')' | '>')
}

/// Replaces a whole token, keeping surrounding quotes and closing
/// punctuation. `None` if nothing is left to replace.
fn redact_whole(tok: &str) -> Option<String> {
    if tok.contains(REDACTED) {
        // Redacted already (a second pass), or a value that holds the
        // marker itself: what else is in it still goes by the other rules.
        return Some(redact_key_shapes(&scan_token(tok).0));
    }
    let lead_end = tok
        .find(|c: char| !matches!(c, '"' | '\'' | '[' | '(' | '{'))
        .unwrap_or(tok.len());
    let trail_start = tok
        .rfind(|c: char| !matches!(c, '"' | '\'' | ',' | ';' | ')' | '}' | ']'))
        .map(|i| i + tok[i..].chars().next().map_or(1, char::len_utf8))
        .unwrap_or(lead_end);
    if trail_start <= lead_end {
        return None;
    }
    Some(format!(
        "{}{REDACTED}{}",
        &tok[..lead_end],
        &tok[trail_start..]
    ))
}

/// Rule 1 inside one token, and rule 2. Returns the new token and what the
/// next token is, if a sensitive name ends this one without a value.
fn scan_token(tok: &str) -> (String, Pending) {
    let mut out = String::with_capacity(tok.len());
    let mut pending = Pending::None;
    let chars: Vec<(usize, char)> = tok.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|(_, c)| *c);
    let byte = |i: usize| chars.get(i).map_or(tok.len(), |(b, _)| *b);
    let mut i = 0;
    let mut copied = 0; // bytes of `tok` already in `out`
    // Rule 2: https://user:PASSWORD@host
    if let Some(scheme_end) = tok.find("://") {
        let auth_start = scheme_end + 3;
        let host_end = tok[auth_start..]
            .find('/')
            .map_or(tok.len(), |e| auth_start + e);
        if let Some(at_rel) = tok[auth_start..host_end].rfind('@')
            && let Some(colon_rel) = tok[auth_start..auth_start + at_rel].find(':')
        {
            out.push_str(&tok[..auth_start + colon_rel + 1]);
            out.push_str(REDACTED);
            copied = auth_start + at_rel;
            i = chars
                .iter()
                .position(|(b, _)| *b >= copied)
                .unwrap_or(chars.len());
        }
    }
    while i < chars.len() {
        let Some(c) = at(i) else { break };
        if !is_ident(c) {
            i += 1;
            continue;
        }
        let start = i;
        while at(i).is_some_and(is_ident) {
            i += 1;
        }
        let name = &tok[byte(start)..byte(i)];
        // Optional closing quote, then the separator.
        let mut j = i;
        if matches!(at(j), Some('"' | '\'')) {
            j += 1;
        }
        if !matches!(at(j), Some('=' | ':')) {
            continue;
        }
        j += 1;
        if !is_sensitive_name(name) {
            i = j;
            continue;
        }
        if matches!(at(j), Some('"' | '\'')) {
            j += 1;
        }
        let value_start = j;
        while at(j).is_some_and(|c| !is_value_end(c)) {
            j += 1;
        }
        let value = &tok[byte(value_start)..byte(j)];
        if value.is_empty() {
            if at(j).is_none() || (at(j + 1).is_none() && matches!(at(j), Some('"' | '\''))) {
                pending = pending_for(name);
            }
            i = j;
            continue;
        }
        if is_auth_name(name) && is_scheme(value) {
            pending = Pending::Value;
            i = j;
            continue;
        }
        out.push_str(&tok[copied..byte(value_start)]);
        out.push_str(REDACTED);
        copied = byte(j);
        i = j;
    }
    out.push_str(&tok[copied..]);
    (out, pending)
}

/// Rule 3: replaces every key-shaped run in `s`.
fn redact_key_shapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        let boundary = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        let hit = boundary
            .then(|| {
                KEY_SHAPES.iter().find_map(|(prefix, min)| {
                    if !bytes[i..].starts_with(prefix.as_bytes()) {
                        return None;
                    }
                    let dotted = matches!(*prefix, "eyJ" | "ya29.");
                    // AWS session tokens are base64: all of it goes.
                    let base64 = *prefix == "IQoJ";
                    let words = !ALNUM_TAILS.contains(prefix);
                    let tail = bytes[i + prefix.len()..]
                        .iter()
                        .take_while(|b| {
                            b.is_ascii_alphanumeric()
                                || (words && matches!(**b, b'_' | b'-'))
                                || (dotted && **b == b'.')
                                || (base64 && matches!(**b, b'+' | b'/' | b'='))
                        })
                        .count();
                    (tail >= *min).then_some(prefix.len() + tail)
                })
            })
            .flatten();
        match hit {
            Some(len) => {
                out.push_str(&s[copied..i]);
                out.push_str(REDACTED);
                i += len;
                copied = i;
            }
            None => i += 1,
        }
    }
    out.push_str(&s[copied..]);
    out
}

/// A whole argument of 32 or more hexadecimal digits with letters and
/// digits both (an Azure key), quotes and closing punctuation aside.
fn is_long_hex(tok: &str) -> bool {
    let t = tok.trim_matches(is_wrapper);
    t.len() >= 32
        && t.bytes().all(|b| b.is_ascii_hexdigit())
        && t.bytes().any(|b| b.is_ascii_digit())
        && t.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Rule 5: a whole argument (quotes, brackets and closing punctuation
/// aside) of 24 to 512 base64 or base64url characters (`~` too; `=` only
/// as trailing padding), not a flag, with upper and lower case letters
/// (two of each) and a digit, whose mixed-case pieces look random: split
/// at the separators (`-`, `_`, `/`, `+`, `~`), the pieces holding both
/// upper and lower case letters must hold 20 characters in all, and their
/// neighbouring characters change class (upper, lower, digit) at least
/// 40 % of the time. Pieces in one case (hex, UUIDs, path words) and the
/// pairs around separators do not count: model ids, branch names, paths
/// with ids in them are words joined by separators, not random text.
/// Random base62 changes class about 62 % of the time (1 in 26 falls
/// short at 24 characters, 1 in 240 at 40; base64 with `+` and `/`, 1 in
/// 10 and 1 in 200); names such as `TestGenerateCompletionWithLongName123`
/// and `HTTP2ConnectionPoolTests2` a third of the time or less.
fn looks_random(tok: &str) -> bool {
    let t = tok.trim_matches(is_wrapper);
    let body = t.trim_end_matches('=');
    if !(24..=512).contains(&body.len())
        || t.len() - body.len() > 2
        || body.starts_with('-')
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || is_key_separator(b))
    {
        return false;
    }
    let class = |b: u8| match b {
        b'A'..=b'Z' => 0u8,
        b'a'..=b'z' => 1,
        _ => 2,
    };
    let mut counts = [0usize; 3];
    for b in body.bytes().filter(u8::is_ascii_alphanumeric) {
        counts[usize::from(class(b))] += 1;
    }
    if counts[0] < 2 || counts[1] < 2 || counts[2] < 1 {
        return false;
    }
    let (mut chars, mut pairs, mut changes) = (0usize, 0usize, 0usize);
    for piece in body.split(|c: char| c.is_ascii() && is_key_separator(c as u8)) {
        let p = piece.as_bytes();
        if !(p.iter().any(u8::is_ascii_uppercase) && p.iter().any(u8::is_ascii_lowercase)) {
            continue;
        }
        chars += p.len();
        for w in p.windows(2) {
            pairs += 1;
            changes += usize::from(class(w[0]) != class(w[1]));
        }
    }
    chars >= 20 && pairs > 0 && changes * 100 >= pairs * 40
}

/// The separators of base64, base64url and the like, inside a key.
fn is_key_separator(b: u8) -> bool {
    matches!(b, b'+' | b'/' | b'_' | b'-' | b'~')
}

/// Quotes, brackets and closing punctuation around a whole argument.
fn is_wrapper(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | ',' | ';' | '(' | ')' | '{' | '}' | '[' | ']'
    )
}

fn is_flag(tok: &str) -> bool {
    tok.len() > 1 && tok.starts_with('-') && !tok[1..].starts_with(|c: char| c.is_ascii_digit())
}

/// Redacts secrets in a command line (see the module docs for the rules).
pub fn redact_cmdline(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    let mut pending = Pending::None;
    // The previous token was curl's `-u`: this one is `user:password`.
    let mut user_flag = false;
    let mut rest = s;
    while !rest.is_empty() {
        let ws = rest
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(rest.len());
        out.push_str(&rest[..ws]);
        rest = &rest[ws..];
        if rest.is_empty() {
            break;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let tok = &rest[..end];
        rest = &rest[end..];

        if pending != Pending::None {
            if pending == Pending::Auth && is_scheme(tok) {
                out.push_str(tok);
                pending = Pending::Value;
                continue;
            }
            if let Some(r) = redact_whole(tok) {
                out.push_str(&r);
                pending = if pending == Pending::Cookie && tok.ends_with(';') {
                    Pending::Cookie
                } else {
                    Pending::None
                };
                continue;
            }
            out.push_str(tok);
            pending = Pending::None;
            continue;
        }

        if is_flag(tok) && !tok.contains(['=', ':']) && is_sensitive_name(tok) {
            out.push_str(tok);
            pending = pending_for(tok);
            continue;
        }
        if user_flag {
            user_flag = false;
            if let Some((user, _)) = tok.split_once(':') {
                out.push_str(user);
                out.push(':');
                out.push_str(REDACTED);
                continue;
            }
        }
        if matches!(tok, "-u" | "--user" | "--proxy-user" | "-U") {
            out.push_str(tok);
            user_flag = true;
            continue;
        }
        if is_long_hex(tok) || looks_random(tok) {
            out.push_str(&redact_whole(tok).unwrap_or_else(|| REDACTED.to_string()));
            continue;
        }
        let (scanned, next) = scan_token(tok);
        out.push_str(&redact_key_shapes(&scanned));
        pending = next;
        if pending == Pending::None
            && tok
                .trim_matches(|c| c == '"' || c == '\'')
                .eq_ignore_ascii_case("bearer")
        {
            pending = Pending::Value;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (command line, secrets that must not survive, text that must survive)
    const CASES: &[(&str, &[&str], &[&str])] = &[
        (
            "tool --api-key Zq9SECRETzq9 run",
            &["Zq9SECRETzq9"],
            &["tool --api-key", "run"],
        ),
        (
            "tool --api-key=Zq9SECRETzq9 run",
            &["Zq9SECRETzq9"],
            &["--api-key=", "run"],
        ),
        ("tool --api_key Zq9SECRETzq9", &["Zq9SECRETzq9"], &[]),
        ("tool --apikey Zq9SECRETzq9", &["Zq9SECRETzq9"], &[]),
        ("tool --token Zq9SECRETzq9", &["Zq9SECRETzq9"], &[]),
        ("tool --token=Zq9SECRETzq9", &["Zq9SECRETzq9"], &[]),
        ("tool --hf-token Zq9SECRETzq9", &["Zq9SECRETzq9"], &[]),
        (
            "tool --access-token Zq9SECRETzq9 --verbose",
            &["Zq9SECRETzq9"],
            &["--verbose"],
        ),
        (
            "mysql --password Zq9SECRETzq9 db",
            &["Zq9SECRETzq9"],
            &["db"],
        ),
        (
            "mysql --password=Zq9SECRETzq9 db",
            &["Zq9SECRETzq9"],
            &["db"],
        ),
        (
            "aws --aws-secret-access-key Zq9SECRETzq9",
            &["Zq9SECRETzq9"],
            &[],
        ),
        ("tool --client-secret Zq9SECRETzq9", &["Zq9SECRETzq9"], &[]),
        (
            "tool -k Zq9SECRETzq9 --key Zq9SECRETzq8",
            &["Zq9SECRETzq8"],
            &["-k"],
        ),
        (
            "curl -H Authorization: Bearer Zq9SECRETzq9 https://api.openai.com/v1/models",
            &["Zq9SECRETzq9"],
            &["Authorization: Bearer", "https://api.openai.com/v1/models"],
        ),
        (
            "curl -H Authorization:Bearer Zq9SECRETzq9",
            &["Zq9SECRETzq9"],
            &[],
        ),
        (
            "curl -H authorization: Zq9SECRETzq9 x",
            &["Zq9SECRETzq9"],
            &[" x"],
        ),
        (
            "curl --header=Authorization: Basic Zq9SECRETzq9",
            &["Zq9SECRETzq9"],
            &["Basic"],
        ),
        (
            "curl -H 'Authorization: Bearer Zq9SECRETzq9'",
            &["Zq9SECRETzq9"],
            &[],
        ),
        (
            "curl -H \"Authorization: Bearer Zq9SECRETzq9\" -d {}",
            &["Zq9SECRETzq9"],
            &["-d {}"],
        ),
        (
            "curl -H x-api-key: Zq9SECRETzq9 https://api.anthropic.com",
            &["Zq9SECRETzq9"],
            &["https://api.anthropic.com"],
        ),
        (
            "curl -H x-api-key:Zq9SECRETzq9",
            &["Zq9SECRETzq9"],
            &["x-api-key:"],
        ),
        ("curl -H api-key: Zq9SECRETzq9", &["Zq9SECRETzq9"], &[]),
        (
            "curl -H x-goog-api-key: Zq9SECRETzq9",
            &["Zq9SECRETzq9"],
            &[],
        ),
        (
            "curl -H Proxy-Authorization: Basic Zq9SECRETzq9",
            &["Zq9SECRETzq9"],
            &[],
        ),
        (
            "curl -H Cookie: a=Zq9SECRETzq9; b=Zq9SECRETzq8 https://x",
            &["Zq9SECRETzq9", "Zq9SECRETzq8"],
            &["https://x"],
        ),
        (
            "curl https://generativelanguage.googleapis.com/v1beta/models/gemini:generateContent?key=Zq9SECRETzq9&alt=sse",
            &["Zq9SECRETzq9"],
            &["generateContent?key=", "&alt=sse"],
        ),
        (
            "curl https://h/p?api_key=Zq9SECRETzq9",
            &["Zq9SECRETzq9"],
            &["https://h/p?api_key="],
        ),
        (
            "curl https://h/p?a=1&token=Zq9SECRETzq9#frag",
            &["Zq9SECRETzq9"],
            &["a=1"],
        ),
        (
            "curl https://h/p?access_token=Zq9SECRETzq9",
            &["Zq9SECRETzq9"],
            &[],
        ),
        (
            "curl https://h/s3?X-Amz-Credential=AKIAZQ9/x&X-Amz-Signature=Zq9SECRETzq9",
            &["Zq9SECRETzq9", "AKIAZQ9"],
            &[],
        ),
        (
            "azcopy copy x 'https://acct.blob.core.windows.net/c?sv=2022-11-02&se=2026-12-01&sp=rw&sig=Zq9SECRETzq9%3D'",
            &["Zq9SECRETzq9"],
            &["sv=2022-11-02", "sp=rw"],
        ),
        (
            "git clone https://oauth2:Zq9SECRETzq9@gitlab.com/g/p.git",
            &["Zq9SECRETzq9"],
            &["@gitlab.com/g/p.git", "https://oauth2:"],
        ),
        (
            "env OPENAI_API_KEY=Zq9SECRETzq9 python x.py",
            &["Zq9SECRETzq9"],
            &["OPENAI_API_KEY=", "python x.py"],
        ),
        ("env ANTHROPIC_API_KEY=Zq9SECRETzq9", &["Zq9SECRETzq9"], &[]),
        ("env GH_TOKEN=Zq9SECRETzq9 gh", &["Zq9SECRETzq9"], &["gh"]),
        (
            "python -c {\"api_key\": \"Zq9SECRETzq9\"}",
            &["Zq9SECRETzq9"],
            &["\"api_key\":"],
        ),
        (
            "python -c {\"api_key\":\"Zq9SECRETzq9\",\"m\":1}",
            &["Zq9SECRETzq9"],
            &[",\"m\":1}"],
        ),
        (
            "python -c client(api_key='Zq9SECRETzq9')",
            &["Zq9SECRETzq9"],
            &["client(api_key='"],
        ),
        (
            "node x.js sk-proj-Zq9SECRETzq9abcdefghij",
            &["Zq9SECRETzq9"],
            &["node x.js"],
        ),
        (
            "node x.js sk-ant-api03-Zq9SECRETzq9abcdefghij-xyz",
            &["Zq9SECRETzq9", "xyz"],
            &[],
        ),
        (
            "node x.js sk-or-v1-Zq9SECRETzq9abcdefghij",
            &["Zq9SECRETzq9"],
            &[],
        ),
        (
            "x --model=gpt AIzaSyZq9SECRETzq9abcdefghijklmnopqrst",
            &["Zq9SECRETzq9"],
            &["--model=gpt"],
        ),
        (
            "aws s3 ls AKIAZQ9SECRETZQ9ABCD",
            &["ZQ9SECRETZQ9"],
            &["aws s3 ls"],
        ),
        ("x ghp_Zq9SECRETzq9abcdefghijklmnop", &["Zq9SECRETzq9"], &[]),
        (
            "x github_pat_Zq9SECRETzq9abcdefghijklmnop",
            &["Zq9SECRETzq9"],
            &[],
        ),
        ("x glpat-Zq9SECRETzq9abcdefghij", &["Zq9SECRETzq9"], &[]),
        ("x gsk_Zq9SECRETzq9abcdefghijklmn", &["Zq9SECRETzq9"], &[]),
        ("x hf_Zq9SECRETzq9abcdefghijklmn", &["Zq9SECRETzq9"], &[]),
        ("x xai-Zq9SECRETzq9abcdefghijklmn", &["Zq9SECRETzq9"], &[]),
        (
            "x eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.Zq9SECRETzq9",
            &["Zq9SECRETzq9", "eyJzdWIi"],
            &[],
        ),
        ("x Bearer Zq9SECRETzq9", &["Zq9SECRETzq9"], &["Bearer"]),
        (
            "gcloud x ya29.a0Zq9SECRETzq9abcdefghij-klmno.pq",
            &["Zq9SECRETzq9", "klmno"],
            &["gcloud x"],
        ),
        (
            "aws x IQoJb3JpZ2luX2VjEZq9/SECRET+zq9abc=== y",
            &["SECRET", "zq9abc"],
            &["aws x", " y"],
        ),
        (
            "az x 0123456789abcdef0123456789ABCDEF run",
            &["0123456789abcdef"],
            &["az x", "run"],
        ),
        (
            "curl -u ci:Zq9SECRETzq9 https://h",
            &["Zq9SECRETzq9"],
            &["-u ci:", "https://h"],
        ),
        (
            "curl --user ci:Zq9SECRETzq9",
            &["Zq9SECRETzq9"],
            &["--user ci:"],
        ),
        (
            "tool --api-key=abc#Zq9SECRETzq9",
            &["Zq9SECRETzq9"],
            &["--api-key="],
        ),
        (
            "x --url=https://u:Zq9SECRETzq9@h/p?key=Zq9SECRETzq8",
            &["Zq9SECRETzq9", "Zq9SECRETzq8"],
            &["@h/p"],
        ),
        (
            "   --token   Zq9SECRETzq9   ",
            &["Zq9SECRETzq9"],
            &["   --token   "],
        ),
        // Rule 5: keys with no known shape, passed positionally.
        (
            "aws configure set aws_secret_access_key k7Q2xRb9/Tn4Lw8PzV3mYc6HsJ1dFg5AeU0oZiXq",
            &["k7Q2xRb9", "AeU0oZiXq"],
            &["aws configure set aws_secret_access_key"],
        ),
        (
            "./deploy.sh prod 'Xq7bT2mN9vLc4RzW8kPd3HsY6fJg' --verbose",
            &["Xq7bT2mN9vLc4RzW8kPd3HsY6fJg"],
            &["./deploy.sh prod '", "' --verbose"],
        ),
        (
            "mistral-cli aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xY",
            &["aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xY"],
            &["mistral-cli"],
        ),
        // Starting with `/` (base64 keys do, one in 32).
        (
            "deploy.sh /k7Q2xRb9Tn4Lw8PzV3mYc6HsJ1dFg5AeU0oZ",
            &["k7Q2xRb9Tn4Lw8PzV3mYc6HsJ1dFg5AeU0oZ"],
            &["deploy.sh"],
        ),
        // In a list, as a script's argv might print it.
        (
            "x [\"Xq7bT2mN9vLc4RzW8kPd3HsY6fJg\"]",
            &["Xq7bT2mN9vLc4RzW8kPd3HsY6fJg"],
            &["x [\""],
        ),
        (
            "x [\"0123456789abcdef0123456789ABCDEF\"]",
            &["0123456789abcdef"],
            &["x [\""],
        ),
        // Vendor prefixes.
        (
            "x sk_live_51Hq7bT2mN9vLc4RzW8kPd3Hs NRAK-ABCDEFGHIJ0123456789KLMNOPQ GOCSPX-aBcD3fGhIjKlMnOpQrStUvWxYz",
            &[
                "51Hq7bT2mN9vLc4RzW8",
                "ABCDEFGHIJ0123456789",
                "aBcD3fGhIjKlMnOpQrStUvWxYz",
            ],
            &["x "],
        ),
        (
            "tool p9Xk2LmQ7vR4tN8wZc1Hy6Bf3Jd5Gs0A+eU/qW== x",
            &["p9Xk2LmQ7vR4tN8wZc1Hy6Bf3Jd5Gs0A"],
            &["tool", " x"],
        ),
    ];

    #[test]
    fn no_secret_survives() {
        for (input, secrets, kept) in CASES {
            let out = redact_cmdline(input);
            for s in *secrets {
                assert!(
                    !out.contains(s),
                    "secret `{s}` survived in `{out}` (from `{input}`)"
                );
            }
            assert!(
                out.contains(REDACTED),
                "nothing redacted in `{out}` (from `{input}`)"
            );
            for k in *kept {
                assert!(out.contains(k), "`{k}` lost in `{out}` (from `{input}`)");
            }
            // Idempotent.
            assert_eq!(redact_cmdline(&out), out, "not idempotent on `{input}`");
        }
    }

    #[test]
    fn harmless_lines_are_unchanged() {
        for s in [
            "python train.py --max-tokens 100 --model gpt-4o-mini",
            "docker run --sig-proxy ubuntu:22.04 echo hi",
            "curl -s https://api.openai.com/v1/models -o out.json",
            "git commit -m task-1234567890abcdefghijklmnop",
            "node ask.js --temperature=0.2 --max_tokens=256",
            "cargo test -p tollgate --lib -- --nocapture",
            "ls -la /tmp/sk-",
            "kubectl --namespace=ci get pods",
            "python -m pytest -k test_author",
            "head -c 1234567890123456789012345678901234 f",
            "curl -u ci https://h",
            "echo deadbeefdeadbeefdeadbeefdeadbeef",
            // Rule 5 leaves names, paths, versions and ids alone.
            "pytest -k TestGenerateCompletionWithLongName123",
            "python -m unittest tests.TestChatCompletionStreaming2Retries",
            "cat src/providers/Fixtures2026/OpenAIBatchOutput3.jsonl",
            "docker run ghcr.io/acme/ci-runner:2026.11.28-build4521",
            "echo 550e8400-e29b-41d4-a716-446655440000",
            "kubectl logs deploy/LlmReviewBot2 -c Sidecar1Container",
            "make HTTP2ConnectionPoolTests2 GRPCv1alpha1Services",
            // Model ids, branches, test selectors, repositories.
            "vllm serve meta-llama/Meta-Llama-3-8B-Instruct",
            "huggingface-cli download deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
            "huggingface-cli download Qwen/Qwen2-VL-7B-Instruct-AWQ",
            "git checkout feature/PROJ-1234-Add-OAuth2-Support",
            "pytest -k test_OpenAI_v2_Streaming_Retries",
            "make build-X86_64-Linux-GNU-Release",
            "tollgate report --repository AcmeCorp/ML-Infra-Tools2",
            "ls /home/runner/work/AcmeWidgets2/AcmeWidgets2",
            "node scripts/runEval.js OpenAI_GPT4_Turbo_2024_04_09",
            // Paths with ids in them, Azure scopes.
            "az role assignment create --scope /subscriptions/550e8400-e29b-41d4-a716-446655440000/resourceGroups/MyResourceGroup",
            "cat /home/runner/work/_temp/550e8400-e29b-41d4-a716-446655440000/Run1Ab",
            "python train.py --output /runs/Llama3-8B/3f2a9b1c4d5e6f70",
            // Names that start with a key's prefix.
            "env npm_config_update_notifier=false npm ci",
            "pytest tests/test_redact.py::test_sk_test_key_is_masked_in_logs",
            "python -c import_hf_hub_download_timeout_settings",
            "docker run csk-config-manager-service-v2",
            "",
            "   ",
        ] {
            assert_eq!(redact_cmdline(s), s);
        }
    }

    #[test]
    fn sensitive_names() {
        for n in [
            "--api-key",
            "api_key",
            "x-api-key",
            "Authorization",
            "OPENAI_API_KEY",
            "GITHUB_TOKEN",
            "password",
            "hftoken",
            "--key",
        ] {
            assert!(is_sensitive_name(n), "{n}");
        }
        for n in [
            "--max-tokens",
            "max_tokens",
            "--model",
            "host",
            "tokenizer",
            "author",
            "--monkeys",
        ] {
            assert!(!is_sensitive_name(n), "{n}");
        }
    }

    #[test]
    fn unicode_and_odd_input_do_not_panic() {
        for s in [
            "ключ=значение --token",
            "--token ",
            "=",
            ":",
            "a:=b",
            "\"",
            "''",
            "https://@",
            "https://a:@b",
            "é sk-",
            "--api-key=\"",
            "x=\u{0}",
        ] {
            let _ = redact_cmdline(s);
        }
        assert_eq!(redact_cmdline("--token \"\" x"), "--token \"\" x");
        // A value holding the marker is still read by the other rules.
        let out = redact_cmdline("--token [REDACTED]https://u:Zq9SECRETzq9@h x");
        assert!(!out.contains("Zq9SECRETzq9"), "{out}");
        assert_eq!(redact_cmdline(&out), out);
    }
}
