//! Redaction of secrets in command lines, before they are stored or logged.
//!
//! Seven rules, applied to each whitespace-separated token:
//! 1. a value after a sensitive name: `--api-key X`, `--token=X`,
//!    `Authorization: Bearer X`, `x-api-key:X`, `OPENAI_API_KEY=X`,
//!    `?key=X&...`, `"api_key": "X"`, `api_key = "X"` (quoted: `token :
//!    parse` is prose), `Cookie: a=b; c=d`. `name=X` as a whole argument,
//!    or after a flag's `=` (`--from-literal=password=X`), takes the rest
//!    of it (`;`, `,`, `)` and `&` are the value's own once the shell's
//!    quoting is gone); a name
//!    whose last word says it is about the secret rather than the secret
//!    (`--token-limit`, `--key-id`, `--secret-name`, `--api-key-file`) is
//!    not sensitive, and a flag (`--name`, `-u`) is never taken as a value
//!    (`--password-stdin -u me`), though a value starting with `-` is;
//! 2. the secret of a URL's user info (`https://user:X@host`, with a `/`
//!    in it too; `https://TOKEN@host` for a user part of 20 or more
//!    letters and digits), of every URL in a word, and a segment of its
//!    path that looks random (rule 5: a webhook's token, Slack's,
//!    Discord's, Telegram's `/botID:TOKEN/`);
//! 3. anything shaped like a provider or forge key (`sk-…`, `AIza…`,
//!    `AKIA…`, `ghp_…`, JWTs, Google OAuth `ya29.…`, AWS session tokens
//!    `IQoJ…`, …) wherever it appears, and a whole argument of 32 or more
//!    hexadecimal digits (Azure keys; commit ids go too);
//! 4. the password of `-u user:PASSWORD` (not a `uid:gid`), and of curl's
//!    `-uuser:PASSWORD`, `-U…`, `--user=user:PASSWORD` and
//!    `-x[ ]user:PASSWORD@proxy`;
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
//! 6. the short flags of tools that take a secret: `-p X` of `docker`,
//!    `podman`, `helm`, `az` (and other registry and cloud CLIs) after
//!    `login`, of `sshpass` and `twine`; attached `-pX` of `sshpass`,
//!    those logins and `mysql` (whose `-p db` prompts); `redis-cli -a X`;
//!    `curl -b X`; `gh secret set NAME --body X`; `mongosh -p X` (and
//!    MongoDB's tools); `poetry`, `uv` and `vsce publish -p X`; `dotnet
//!    nuget push -k X`; HTTPie's `-a user:X`; `--value X` once
//!    `secret` or `put-parameter` was said (`az keyvault secret set`,
//!    `aws ssm put-parameter`); each also as `-p=X`, `--body=X` or
//!    attached (`-bX`). Elsewhere `-p` is a port. And secrets by their
//!    place: `htpasswd -b FILE USER X` (`-nb USER X`), `mysqladmin
//!    password X`, `redis-cli AUTH [USER] X` (every word to the command's
//!    end) and `CONFIG SET requirepass X`, a here-string after a flag that
//!    reads one from stdin (`--with-token <<< X`, `--password-stdin <<<
//!    X`), and a `.netrc` line's `login U password X`. A tool's command
//!    ends at `&&`, `||`, `;`, `|` and `&`.
//!
//! 7. SQL's `PASSWORD 'X'`, `PASSWORD('X')`, `IDENTIFIED [WITH plugin]
//!    BY 'X'` and `SET PASSWORD FOR u = 'X'` (`psql -c`, `mysql -e`).
//!
//! A sensitive name's tuple or list value (`auth=('ci', 'X')`,
//! `API_TOKEN=(a b)`) goes to its closing bracket. Go's MySQL DSNs, which
//! have no scheme, lose their password as a URL does (`u:X@tcp(db)/app`).
//! SonarQube's `sonar.login` is a token.
//!
//! A JSON pair (`{"name": "OPENAI_API_KEY", "value": "X"}`: Kubernetes
//! env, ECS overrides) has its value redacted, not its `value` key.
//!
//! A quoted value (`api_key='a,b'`, `"password": "a b"`) runs to its
//! closing quote: the first one not escaped and not followed by a letter
//! or digit (`'don't tell'` is one value). In a shell's script (`sh -c`)
//! or a flattened line, a value redacted at the end of a word inside
//! quotes still open runs to where they close, whichever rule found it
//! (`-H 'X-Api-Key: a b'`, `-u "me:a b"`, `mysql -p'a b'`), unless a word
//! of prose named it (`"Password: at least 12"`); `#` comments and
//! apostrophes in words (`didn't`) open no quote.
//!
//! It errs towards redacting too much: a value after a sensitive flag goes
//! whatever it is (`--sort-key name`). Counts such as `--max-tokens 100`
//! are kept.

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
    "passphrase",
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
    "creds",
    "pat",
    "pw",
];

/// Names sensitive only as a whole: `sig` (Azure Storage SAS URLs,
/// `...&sig=...`), not `--sig-proxy`.
/// keytool's and jarsigner's store and key passwords too.
const SENSITIVE_NAMES: &[&str] = &[
    "sig",
    "storepass",
    "keypass",
    "srcstorepass",
    "deststorepass",
    "srckeypass",
    "destkeypass",
    "requirepass",
    "masterauth",
];

/// Endings that make a name sensitive once separators are removed
/// (`OPENAIAPIKEY`, `hftoken`, `clientsecret`).
const SENSITIVE_ENDINGS: &[&str] = &[
    "key",
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "authorization",
    "credentials",
    "cookie",
    "authident",
    "pw",
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
    ("pypi-", 20),
    ("xoxb-", 20),
    ("xoxp-", 20),
    ("eyJ", 20),
    ("ya29.", 20),
    ("IQoJ", 20),
    ("hvs.", 20),
    ("hvb.", 20),
    ("squ_", 30),
    ("sqp_", 30),
    ("sqa_", 30),
];

/// Prefixes whose keys are letters and digits only: their tail stops at
/// the first `_` or `-`, so that names that merely start with one
/// (`npm_config_update_notifier`, `test_sk_test_key_is_masked`,
/// `hf_hub_download_timeout`) are not keys.
const ALNUM_TAILS: &[&str] = &[
    "gsk_", "xai-", "pplx-", "fw_", "r8_", "hf_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
    "sk_live_", "sk_test_", "rk_live_", "rk_test_", "csk-", "dop_v1_", "NRAK-", "bkua_", "npm_",
    "squ_", "sqp_", "sqa_",
];

/// Last words that make a sensitive name about something else: the
/// secret's limit, id, name or file (`--token-limit 4096`, `--key-id 3`,
/// `--secret-name prod/openai`, `--api-key-file PATH`).
const NOT_THE_SECRET: &[&str] = &[
    "id", "ids", "limit", "limits", "budget", "name", "names", "count", "size", "file", "files",
    "path", "dir", "type", "length", "len", "ttl", "timeout", "env", "region", "version", "fd",
    "stdin",
];

/// Whether `name` (a flag, header, variable or parameter name) names a secret.
pub(super) fn is_sensitive_name(name: &str) -> bool {
    let lower = name
        .trim_matches(|c| c == '-' || c == '"' || c == '\'')
        .to_ascii_lowercase();
    if lower.is_empty() {
        return false;
    }
    // Vault's AppRole `secret_id=X` is the credential; `--secret-id` (AWS)
    // names a secret.
    if !name.starts_with('-') && matches!(lower.as_str(), "secret_id" | "secretid") {
        return true;
    }
    let mut words = lower.split(['-', '_', '.']);
    if words.clone().count() > 1
        && words
            .next_back()
            .is_some_and(|w| NOT_THE_SECRET.contains(&w))
    {
        return false;
    }
    // SonarQube's `-Dsonar.login=TOKEN` (its `sonar.password` is a word's).
    if SENSITIVE_NAMES.contains(&lower.as_str()) || lower.ends_with("sonar.login") {
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
    let w = word.trim_matches(|c| matches!(c, '"' | '\'' | '`'));
    SCHEMES.iter().any(|s| w.eq_ignore_ascii_case(s))
}

/// A word that may be an Authorization scheme this module does not know:
/// letters, `-` and `_` only (a credential has digits or other signs, as a
/// rule), not closing its quoted argument.
fn scheme_shaped(word: &str) -> bool {
    let w = word.trim_start_matches(['"', '\'', '`']);
    (2..=32).contains(&w.len())
        && w.starts_with(|c: char| c.is_ascii_alphabetic())
        && w.bytes()
            .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
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
    /// After `name =`: redact the next token if it is quoted.
    Quoted,
    /// Inside a quoted value that went on past its first word (`"api_key":
    /// "correct horse"`): redact up to this closing quote.
    UntilQuote(char),
    /// Inside a tuple or list value that went on past its first word
    /// (`auth=('ci', 'X')`, `TOKENS=(a b)`): redact up to this bracket.
    /// The bracket, and how many are open (nested: `auth=(user(), 'X')`).
    UntilClose(char, u8),
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

/// Where the bracket `close` that ends a value with `depth` brackets open
/// comes in `chars` (its index among them), counting `open`s and `close`s
/// as it goes; else `None`, and how many are open at the end (at most
/// 255).
fn closing_bracket(
    chars: impl Iterator<Item = char>,
    open: char,
    close: char,
    mut depth: u8,
) -> (Option<usize>, u8) {
    for (n, c) in chars.enumerate() {
        if c == open {
            depth = depth.saturating_add(1);
        } else if c == close {
            depth = depth.saturating_sub(1);
            if depth == 0 {
                return (Some(n), 0);
            }
        }
    }
    (None, depth)
}

/// Where a quoted value that opened before `from` closes in `chars` (a
/// word's `char_indices`; the index into them is returned): the
/// first `q` not followed by a letter or digit (`'don't'` closes at its
/// end, `"a,b"` past its comma) and, for `"`, not escaped by an odd number
/// of backslashes (`"a\\"` closes, `"a\""` does not; in a shell's `'…'` a
/// backslash is a backslash). A shell's way of putting `'` in a
/// single-quoted word, `'it'\''s'` or `'it'"'"'s'`, goes on.
fn closing_quote(chars: &[(usize, char)], from: usize, q: char) -> Option<usize> {
    let at = |k: usize| chars.get(k).map(|(_, c)| *c);
    let mut k = from;
    while k < chars.len() {
        if at(k) != Some(q) {
            k += 1;
            continue;
        }
        let follows = |s: &str| s.chars().enumerate().all(|(n, c)| at(k + 1 + n) == Some(c));
        if q == '\'' {
            if follows("\\''") {
                k += 4;
                continue;
            }
            if follows("\"'\"'") {
                k += 5;
                continue;
            }
        }
        let escapes = chars[..k]
            .iter()
            .rev()
            .take_while(|(_, c)| *c == '\\')
            .count();
        let escaped = q == '"' && escapes % 2 == 1;
        if !escaped && !at(k + 1).is_some_and(char::is_alphanumeric) {
            return Some(k);
        }
        k += 1;
    }
    None
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
        .find(|c: char| !matches!(c, '"' | '\'' | '`' | '[' | '(' | '{'))
        .unwrap_or(tok.len());
    let mut trail_start = tok
        .rfind(|c: char| !matches!(c, '"' | '\'' | '`' | ',' | ';' | ')' | '}' | ']'))
        .map(|i| i + tok[i..].chars().next().map_or(1, char::len_utf8))
        .unwrap_or(lead_end);
    // An escaped quote (`\"`) keeps its backslash: without it, a second
    // pass would read the quote as one that closes.
    if trail_start > lead_end
        && tok[..trail_start].ends_with('\\')
        && tok[trail_start..].starts_with(['"', '\''])
    {
        trail_start -= 1;
    }
    if trail_start <= lead_end {
        return None;
    }
    Some(format!(
        "{}{REDACTED}{}",
        &tok[..lead_end],
        &tok[trail_start..]
    ))
}

/// Whether a name that follows `before` starts its argument: nothing but
/// quotes before it, or a flag's `--flag=` (`--from-literal=password=X`).
fn starts_the_argument(before: &str) -> bool {
    let b = before.trim_start_matches(['"', '\'']);
    b.is_empty()
        || (b.starts_with('-')
            && b.ends_with('=')
            && b[..b.len() - 1]
                .trim_start_matches('-')
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')))
}

/// Rule 1 inside one token, and rule 2. Returns the new token and what the
/// next token is, if a sensitive name ends this one without a value.
fn scan_token(tok: &str) -> (String, Pending) {
    let urls = redact_urls(tok);
    let dsns = redact_dsns(&urls);
    let tok: &str = &dsns;
    let mut out = String::with_capacity(tok.len());
    let mut pending = Pending::None;
    let chars: Vec<(usize, char)> = tok.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|(_, c)| *c);
    let byte = |i: usize| chars.get(i).map_or(tok.len(), |(b, _)| *b);
    let is_quote = |c: Option<char>| matches!(c, Some('"' | '\''));
    // `\"` in a script's double-quoted JSON (`"{\"password\":\"X\"}"`).
    let escaped_quote = |i: usize| at(i) == Some('\\') && is_quote(at(i + 1));
    let mut i = 0;
    let mut copied = 0; // bytes of `tok` already in `out`
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
        // Optional closing quote (and a subscript's `]`:
        // `os.environ['OPENAI_API_KEY']=X`), then the separator; a quoted
        // name may be a call's argument too (`setdefault('API_KEY','X')`).
        let quoted_name = start > 0 && is_quote(at(start - 1));
        let mut j = i;
        if is_quote(at(j)) {
            j += 1;
            if at(j) == Some(']') {
                j += 1;
            }
        } else if escaped_quote(j) {
            j += 2;
        }
        let argument = quoted_name && at(j) == Some(',');
        // `token::tests` is a path, not a name and its value: a lower-case
        // segment after it (`token::tests`, `auth::login(`), the name at
        // the word's start or after another `::` (not `api_token::Zq9`,
        // `name=api_token::x`).
        let path = at(j) == Some(':')
            && at(j + 1) == Some(':')
            && (start == 0
                || (start >= 2 && at(start - 1) == Some(':') && at(start - 2) == Some(':')))
            && {
                let mut k = j + 2;
                while at(k)
                    .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                {
                    k += 1;
                }
                k > j + 2
                    && (at(k).is_none()
                        || at(k) == Some('(')
                        || (at(k) == Some(':') && at(k + 1) == Some(':')))
            };
        // SQL's `PASSWORD('X')`, `OLD_PASSWORD('X')`.
        let call = !quoted_name
            && at(j) == Some('(')
            && is_quote(at(j + 1))
            && name.to_ascii_lowercase().ends_with("password");
        if path || (!argument && !call && !matches!(at(j), Some('=' | ':'))) {
            i = if path { j + 2 } else { i };
            continue;
        }
        j += 1;
        if !is_sensitive_name(name) {
            i = j;
            continue;
        }
        // `{"name":"OPENAI_API_KEY","value":"X"}` (Kubernetes env, ECS
        // overrides, Terraform variables): the pair's value is the value.
        if argument {
            let key: String = (j..j + 8).filter_map(at).collect();
            if key.len() == 8
                && key.is_ascii()
                && is_quote(key.chars().next())
                && key[1..6].eq_ignore_ascii_case("value")
                && is_quote(key.chars().nth(6))
                && key.ends_with(':')
            {
                j += 8;
            }
        }
        let escaped = escaped_quote(j);
        let quoted = is_quote(at(j)) || escaped;
        if escaped {
            j += 1;
        }
        if quoted {
            j += 1;
        }
        let value_start = j;
        // `--password=X` or `API_KEY=X` as a whole argument: the shell's
        // quoting is gone, so `;`, `,`, `)` and `&` are the value's own.
        // Only a closing quote at the very end is kept (an argument that
        // was one word of a longer quoted string).
        let whole_argument =
            !quoted && at(j - 1) == Some('=') && starts_the_argument(&tok[..byte(start)]);
        if whole_argument {
            j = chars.len();
            while j > value_start && matches!(at(j - 1), Some('"' | '\'')) {
                j -= 1;
            }
        }
        // A tuple or list (`auth=('ci', 'X')`, `TOKENS=(a b)`): what is
        // inside the brackets, in later words too.
        if !quoted
            && let Some(open @ ('(' | '[')) = at(value_start)
            && !tok[byte(value_start)..].starts_with(REDACTED)
        {
            let close = if open == '(' { ')' } else { ']' };
            let (end, depth) = closing_bracket(
                chars[value_start + 1..].iter().map(|(_, c)| *c),
                open,
                close,
                1,
            );
            let end = end.map(|k| value_start + 1 + k);
            if !(whole_argument && end.is_some()) {
                out.push_str(&tok[copied..byte(value_start + 1)]);
                out.push_str(REDACTED);
                match end {
                    Some(k) => {
                        copied = byte(k);
                        i = k;
                    }
                    None => {
                        copied = tok.len();
                        i = chars.len();
                        pending = Pending::UntilClose(close, depth);
                    }
                }
                continue;
            }
        }
        // A quoted value runs to its closing quote (`api_key='a,b'`), or
        // to the word's end if it closes in a later word.
        let closes = if escaped {
            let q = at(value_start - 1).unwrap_or('"');
            Some((value_start..chars.len()).find(|&k| at(k) == Some('\\') && at(k + 1) == Some(q)))
        } else if quoted {
            let q = at(value_start - 1).unwrap_or('"');
            Some(closing_quote(&chars, value_start, q))
        } else {
            None
        };
        match closes {
            Some(Some(k)) => j = k,
            Some(None) => j = chars.len(),
            None => {
                while !whole_argument && at(j).is_some_and(|c| !is_value_end(c)) {
                    j += 1;
                }
            }
        }
        let value = &tok[byte(value_start)..byte(j)];
        // `https://x-access-token:[REDACTED]@github.com/o/r`: the URL's
        // password, redacted already; its host and path stay.
        if value.starts_with(&format!("{REDACTED}@")) {
            i = j;
            continue;
        }
        if value.is_empty() {
            if at(j).is_none() || (at(j + 1).is_none() && matches!(at(j), Some('"' | '\''))) {
                // After a call's `,`, only a quoted next word is the value
                // (`putenv('API_KEY', name)` passes a variable).
                pending = if argument {
                    Pending::Quoted
                } else {
                    pending_for(name)
                };
            }
            i = j;
            continue;
        }
        if argument && !quoted {
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
        // A quoted value that does not close in this word goes on in the
        // next ones (`"password": "correct horse"`).
        if quoted
            && at(j).is_none()
            && let Some(q) = at(value_start - 1)
        {
            pending = Pending::UntilQuote(q);
        }
    }
    out.push_str(&tok[copied..]);
    (out, pending)
}

/// Rule 2 for every URL in a word (`{"ok":"https://a/cb","db":"postgres://
/// u:X@db"}`). A URL's authority is read within its first 2 KiB, so that
/// a word of them costs at most 2 KiB a URL.
fn redact_urls(tok: &str) -> std::borrow::Cow<'_, str> {
    if !tok.contains("://") {
        return std::borrow::Cow::Borrowed(tok);
    }
    let mut out = String::with_capacity(tok.len());
    let (mut copied, mut from) = (0, 0);
    while let Some(i) = tok[from..].find("://") {
        let auth = from + i + 3;
        let end = tok.floor_char_boundary(auth.saturating_add(2048).min(tok.len()));
        if let Some((start, stop)) = url_secret(&tok[..end], auth) {
            out.push_str(&tok[copied..start]);
            out.push_str(REDACTED);
            copied = stop;
        }
        // The path, to the query: a segment that looks random is a token
        // (Slack's and Discord's webhooks, Telegram's `/botID:TOKEN/`).
        let url_end = tok[auth..end]
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | '?' | '#' | ',')
            })
            .map_or(end, |e| auth + e);
        let after = copied.max(auth).min(url_end);
        if let Some(p) = tok[after..url_end].find('/') {
            let path = after + p + 1;
            let mut seg = path;
            for (k, c) in tok[path..url_end]
                .char_indices()
                .chain(std::iter::once((url_end - path, '/')))
            {
                if c == '/' || c == ':' {
                    let at = path + k;
                    if looks_random(&tok[seg..at]) {
                        out.push_str(&tok[copied..seg]);
                        out.push_str(REDACTED);
                        copied = at;
                    }
                    seg = at + c.len_utf8();
                }
            }
        }
        from = url_end.max(auth).max(copied);
    }
    out.push_str(&tok[copied..]);
    std::borrow::Cow::Owned(out)
}

/// Go's MySQL DSNs, which have no scheme: the password of
/// `user:PASSWORD@tcp(db:3306)/app` (`@unix(`, `@udp(` too). The user
/// starts after a quote, `=` or the like, and has no `//` (a URL's is
/// rule 2's).
fn redact_dsns(tok: &str) -> std::borrow::Cow<'_, str> {
    const NETS: &[&str] = &["tcp(", "tcp4(", "tcp6(", "unix(", "udp("];
    if !tok.contains("@tcp") && !tok.contains("@unix(") && !tok.contains("@udp(") {
        return std::borrow::Cow::Borrowed(tok);
    }
    let is_user = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    let is_delimiter = |c: char| {
        c.is_whitespace() || matches!(c, '"' | '\'' | '=' | '`' | ',' | ';' | '{' | '[' | '(')
    };
    let mut out = String::with_capacity(tok.len());
    let mut copied = 0;
    // The `@` before the network is the driver's (the last before it: a
    // password may hold `@`, `=`, `,`, `;` or quotes).
    for (at, _) in tok.match_indices('@') {
        if at < copied || !NETS.iter().any(|n| tok[at + 1..].starts_with(n)) {
            continue;
        }
        // The user: the first run of user characters after a delimiter
        // (or the start) that a `:` follows, between the last DSN and this
        // `@`. Each character is looked at once: linear in the word.
        let region = &tok[copied..at];
        let mut colon = None;
        // In a run of user characters that began after a delimiter or at
        // the start; the character before was a delimiter.
        let (mut anchored, mut after_delimiter) = (false, true);
        for (k, c) in region.char_indices() {
            if c == ':' && anchored {
                colon = Some(copied + k);
                break;
            }
            anchored = is_user(c) && (anchored || after_delimiter);
            after_delimiter = is_delimiter(c);
        }
        let Some(colon) = colon else { continue };
        let password = &tok[colon + 1..at];
        // (`mysql://u:X@tcp(...)` is a URL's, redacted as one already.)
        if !password.is_empty() && !password.starts_with("//") && !password.starts_with(REDACTED) {
            out.push_str(&tok[copied..colon + 1]);
            out.push_str(REDACTED);
            copied = at;
        }
    }
    out.push_str(&tok[copied..]);
    std::borrow::Cow::Owned(out)
}

/// The byte range of the secret in a URL's user info, the authority
/// starting at `auth_start`: the password of `user:PASSWORD@host` (a `/`
/// in it too, as people write them unescaped: `postgres://u:pa/ss@db`,
/// though not where what follows the colon is a port, `host:8080/a/@b`),
/// or a user part that is a token by itself (`https://TOKEN@host`: 20
/// characters or more with letters and digits).
fn url_secret(tok: &str, auth_start: usize) -> Option<(usize, usize)> {
    let rest = &tok[auth_start..];
    // The authority ends at the first `/`, or at a `?` or `#` before it
    // with no `:` ahead of it (a query: `host?email=a@b`); after a `:` they
    // may be a password's (`root:Pa#ss@db`).
    let slash = rest.find('/').unwrap_or(rest.len());
    let host_end = match rest[..slash].find(['?', '#']) {
        Some(q) if !rest[..q].contains(':') => q,
        _ => slash,
    };
    if let Some(at) = rest[..host_end].rfind('@') {
        let info = &rest[..at];
        return match info.find(':') {
            Some(colon) => Some((auth_start + colon + 1, auth_start + at)),
            None => (info.len() >= 20
                && info.bytes().any(|b| b.is_ascii_digit())
                && info.bytes().any(|b| b.is_ascii_alphabetic()))
            .then_some((auth_start, auth_start + at)),
        };
    }
    // An `@` past the first `/`: a password with a `/` in it, or a path.
    let at = rest[..rest.find(['?', '#']).unwrap_or(rest.len())].rfind('@')?;
    let info = &rest[..at];
    let colon = info.find(':')?;
    let password = &info[colon + 1..];
    let first = password.split('/').next().unwrap_or("");
    let port = !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit());
    (!info[..colon].contains('/') && !port && !password.is_empty())
        .then_some((auth_start + colon + 1, auth_start + at))
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

/// A shell operator that ends a command (`&&`, `||`, `;`, `|`).
fn is_command_end(tok: &str) -> bool {
    matches!(tok, "&&" | "||" | ";" | "|" | "&")
}

fn is_flag(tok: &str) -> bool {
    tok.len() > 1 && tok.starts_with('-') && !tok[1..].starts_with(|c: char| c.is_ascii_digit())
}

/// Tools whose short flags carry a secret (rule 6), and what arms them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    /// Registry and cloud logins: `-p PASSWORD` after `login`.
    Login { armed: bool },
    /// `sshpass -p PASSWORD`, `sshpass -pPASSWORD`.
    Sshpass,
    /// `twine upload -p PASSWORD`.
    Twine,
    /// `mysql -pPASSWORD` (attached only: `-p db` prompts).
    Mysql,
    /// `mysqladmin -pPASSWORD`, and its `password NEW` command.
    Mysqladmin { password: bool },
    /// `redis-cli -a PASSWORD`, and its commands `AUTH [user] PASSWORD`
    /// (every word after `AUTH`, to the command's end) and `CONFIG SET
    /// requirepass PASSWORD`.
    RedisCli { auth: bool, next: bool },
    /// `htpasswd -b FILE USER PASSWORD`, `htpasswd -nb USER PASSWORD`:
    /// positional words after the flags, counted (not the values of
    /// `-C COST` and `-r ROUNDS`: `value_next`).
    Htpasswd {
        batch: bool,
        no_file: bool,
        seen: u8,
        value_next: bool,
    },
    /// `curl -b COOKIES`, `curl -x user:PASSWORD@proxy`.
    Curl,
    /// `gh secret set NAME --body VALUE` (`-b`), once `secret` is seen.
    Gh { armed: bool },
    /// MongoDB's shell and tools: `-p PASSWORD`.
    Mongo,
    /// `poetry publish`, `uv publish`, `vsce publish`: `-p PASSWORD`.
    Publish { armed: bool },
    /// `dotnet nuget push -k KEY`.
    Nuget { armed: bool },
    /// HTTPie: `http -a user:PASSWORD`.
    Httpie,
}

impl Tool {
    /// The tool an argument runs, by its file name.
    fn named(tok: &str) -> Option<Tool> {
        let name = tok.trim_matches(|c| c == '"' || c == '\'');
        let name = name.rsplit(['/', '\\']).next().unwrap_or(name);
        let name = name.strip_suffix(".exe").unwrap_or(name);
        Some(match name {
            "docker" | "podman" | "buildah" | "skopeo" | "nerdctl" | "helm" | "oras" | "crane"
            | "regctl" | "az" | "cf" | "oc" => Tool::Login { armed: false },
            "sshpass" => Tool::Sshpass,
            "twine" => Tool::Twine,
            "mysql" | "mysqldump" | "mysqlimport" | "mysqlcheck" | "mariadb" | "mariadb-dump" => {
                Tool::Mysql
            }
            "mysqladmin" | "mariadb-admin" => Tool::Mysqladmin { password: false },
            "redis-cli" | "valkey-cli" => Tool::RedisCli {
                auth: false,
                next: false,
            },
            "htpasswd" => Tool::Htpasswd {
                batch: false,
                no_file: false,
                seen: 0,
                value_next: false,
            },
            "curl" => Tool::Curl,
            "gh" => Tool::Gh { armed: false },
            "mongosh" | "mongo" | "mongodump" | "mongorestore" | "mongoexport" | "mongoimport" => {
                Tool::Mongo
            }
            "poetry" | "uv" | "vsce" => Tool::Publish { armed: false },
            "dotnet" | "nuget" => Tool::Nuget { armed: false },
            "http" | "https" => Tool::Httpie,
            _ => return None,
        })
    }

    /// After `tok`, an argument of this tool that is not a flag's value:
    /// `None` once the tool runs another program (`sshpass -p X ssh -p 22`).
    fn after(self, tok: &str) -> Option<Tool> {
        Some(match (self, tok) {
            (Tool::Login { .. }, "login" | "auth") => Tool::Login { armed: true },
            (Tool::Gh { .. }, "secret") => Tool::Gh { armed: true },
            (Tool::Publish { .. }, "publish") => Tool::Publish { armed: true },
            (Tool::Nuget { .. }, "push") => Tool::Nuget { armed: true },
            (Tool::Sshpass, _) => return None,
            (Tool::Mysqladmin { .. }, _) => Tool::Mysqladmin {
                password: tok == "password",
            },
            (Tool::RedisCli { auth, .. }, _) => Tool::RedisCli {
                auth: auth || tok.eq_ignore_ascii_case("auth"),
                next: tok.eq_ignore_ascii_case("requirepass")
                    || tok.eq_ignore_ascii_case("masterauth"),
            },
            (
                Tool::Htpasswd {
                    batch,
                    no_file,
                    seen,
                    value_next,
                },
                _,
            ) => Tool::Htpasswd {
                batch,
                no_file,
                seen: seen.saturating_add(u8::from(!value_next)),
                value_next: false,
            },
            (t, _) => t,
        })
    }

    /// After `flag`, a flag of this tool: `htpasswd`'s `-b` and `-n`
    /// (in a cluster too: `-nbB`).
    fn flag(self, flag: &str) -> Tool {
        match self {
            Tool::Htpasswd {
                batch,
                no_file,
                seen,
                ..
            } if !flag.starts_with("--")
                && flag[1..].bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                Tool::Htpasswd {
                    batch: batch || flag.contains('b'),
                    no_file: no_file || flag.contains('n'),
                    seen,
                    // `-C COST`, `-r ROUNDS` (alone or ending a cluster).
                    value_next: flag.ends_with(['C', 'r']),
                }
            }
            t => t,
        }
    }

    /// Whether the next word that is not a flag is a secret by its place
    /// (`mysqladmin password X`, `redis-cli AUTH X`, `htpasswd -b f u X`).
    fn positional_secret(self, tok: &str) -> bool {
        if is_command_end(tok) {
            return false;
        }
        match self {
            Tool::Mysqladmin { password } => password,
            Tool::RedisCli { auth, next } => auth || next,
            Tool::Htpasswd {
                batch: true,
                no_file,
                seen,
                value_next: false,
            } => seen == if no_file { 1 } else { 2 },
            _ => false,
        }
    }

    /// The flags of this tool that take a secret: given alone (the next
    /// argument is the secret), and short ones that carry it attached
    /// (`-pX`); any of them with `=` (`--body=X`, `-p=X`) carries it too.
    fn secret_flags(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Tool::Login { armed: true } | Tool::Sshpass | Tool::Twine => (&["-p"], &["-p"]),
            Tool::Mysql | Tool::Mysqladmin { .. } => (&[], &["-p"]),
            Tool::RedisCli { .. } => (&["-a"], &["-a"]),
            Tool::Curl => (&["-b"], &["-b"]),
            Tool::Gh { armed: true } => (&["-b", "--body"], &["-b"]),
            Tool::Mongo | Tool::Publish { armed: true } => (&["-p"], &[]),
            Tool::Nuget { armed: true } => (&["-k"], &[]),
            Tool::Login { armed: false }
            | Tool::Gh { armed: false }
            | Tool::Publish { armed: false }
            | Tool::Nuget { armed: false }
            | Tool::Httpie
            | Tool::Htpasswd { .. } => (&[], &[]),
        }
    }

    /// What comes after `flag`, given alone, when it takes a secret.
    fn takes_secret(self, flag: &str) -> Option<Pending> {
        self.secret_flags().0.contains(&flag).then_some(match self {
            Tool::Curl => Pending::Cookie,
            _ => Pending::Value,
        })
    }

    /// Where the secret starts in an argument that carries it attached
    /// (`-pX`, `-p=X`, `--body=X`).
    fn attached_secret(self, tok: &str) -> Option<usize> {
        let (alone, attached) = self.secret_flags();
        alone.iter().chain(attached).find_map(|f| {
            let rest = tok.strip_prefix(f)?;
            if let Some(v) = rest.strip_prefix('=') {
                return (!v.is_empty()).then_some(f.len() + 1);
            }
            (!rest.is_empty() && attached.contains(f)).then_some(f.len())
        })
    }
}

/// `user:[REDACTED]` for a `user:password` argument; `None` for one with
/// no colon, a `uid:gid` (`docker run -u 1000:1000`) or a URL.
fn user_password(value: &str) -> Option<String> {
    if value.contains("://") {
        return None; // a URL (`redis-cli -u redis://…`): rule 2's
    }
    let (user, password) = value.split_once(':')?;
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if numeric(user) && numeric(password) {
        return None;
    }
    // A closing quote stays (`"me:pw"` in a script).
    let quotes = &password[password.trim_end_matches(['"', '\'']).len()..];
    Some(format!("{user}:{REDACTED}{quotes}"))
}

/// `user:[REDACTED]@proxy` for a `user:password@proxy` argument (curl's
/// `-x`, with no scheme: one with a scheme is rule 2's).
fn proxy_password(value: &str) -> Option<String> {
    if value.contains("://") {
        return None;
    }
    let (info, host) = value.rsplit_once('@')?;
    let (user, _) = info.split_once(':')?;
    Some(format!("{user}:{REDACTED}@{host}"))
}

/// A flag whose value is a script: `-c` of a shell or Python (`sh -c`,
/// `bash -lc`, `bash -euc`, `bash -ce`, `bash -cex`).
fn is_script_flag(arg: &str) -> bool {
    arg.len() <= 6
        && arg.strip_prefix('-').is_some_and(|f| {
            f.contains('c') && !f.starts_with('-') && f.bytes().all(|b| b.is_ascii_alphabetic())
        })
}

/// A name written as an identifier (`db_password`, `api-key`,
/// `gpg.passphrase`, `clientSecret`), not a word (`Password`, `hotkey`,
/// `PWD`, `auth`): as the first word of an argument with a colon, it makes
/// the rest of the argument its value (`db_password: a b`), where a word
/// is prose (`password: minimum length is now 12`).
fn is_identifier(name: &str) -> bool {
    name.contains(['_', '-', '.']) || is_camel_case(name)
}

/// `npmAuthToken`, `clientSecret`: a lower-case letter, then a capital.
fn is_camel_case(name: &str) -> bool {
    name.as_bytes()
        .windows(2)
        .any(|w| w[0].is_ascii_lowercase() && w[1].is_ascii_uppercase())
}

/// A name written as an HTTP header's (`Authorization`, `X-Api-Key`,
/// `Cookie`), not a word of prose (`auth`, `token`).
fn is_header_name(name: &str) -> bool {
    let l = name.to_ascii_lowercase();
    name.contains('-') || l.ends_with("authorization") || l.ends_with("cookie")
}

/// Whether `tok` is a flag rather than a value that starts with `-`: a
/// long flag (`--name`, `--name=…`: letters, digits, `-`, `_`, `.`) or a
/// single letter (`-u`). A key or password may start with `-` too.
fn is_flag_word(tok: &str) -> bool {
    if tok == "--" {
        return true;
    }
    if let Some(long) = tok.strip_prefix("--") {
        let name = long.split('=').next().unwrap_or("");
        return name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    }
    let b = tok.as_bytes();
    b.len() == 2 && b[0] == b'-' && b[1].is_ascii_alphabetic()
}

/// The trailing name of `tok` (`OpenAI(api_key` → `api_key`), also
/// quoted or subscripted (`env['API_KEY']` → `API_KEY`).
fn trailing_name(tok: &str) -> &str {
    let tok = tok.strip_suffix(']').unwrap_or(tok);
    let tok = tok.strip_suffix(['"', '\'']).unwrap_or(tok);
    let start = tok
        .char_indices()
        .rev()
        .find(|(_, c)| !is_ident(*c))
        .map_or(0, |(i, c)| i + c.len_utf8());
    &tok[start..]
}

/// A name written as an identifier (`openai_api_key`, `npmAuthToken`,
/// `gpg.passphrase`), not in capitals (an environment variable's name,
/// `env -u OPENAI_API_KEY cmd`), whose last word is the secret: given as a
/// bare word, the next word is its value (`papermill -p openai_api_key X`,
/// `yarn config set npmAuthToken X`). A plain word (`token`) is not one:
/// `token : parse` is prose.
fn names_a_value(name: &str) -> bool {
    // Not by `-`: `--api-key` is a flag's name, handled as a flag.
    let identifier = name.contains(['_', '.']) || is_camel_case(name);
    let capitals = !name.bytes().any(|b| b.is_ascii_lowercase());
    let compact: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    // npm's `_auth` (`npm config set _auth X`).
    name == "_auth"
        || (identifier
            && !capitals
            && is_sensitive_name(name)
            && SENSITIVE_ENDINGS.iter().any(|e| compact.ends_with(e)))
}

/// Redacts secrets in a command line (see the module docs for the rules),
/// one whitespace-separated word after another.
pub fn redact_cmdline(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    let mut r = Redactor::default();
    r.words(s, &mut out);
    out
}

/// Redacts an argument vector (`/proc/PID/cmdline`), joined by spaces.
/// The words of each argument go by the rules of [`redact_cmdline`], but
/// where the words cannot tell, the argument does: the value of a
/// sensitive flag is the whole next argument (`--password`, `two words`);
/// a value redacted at the end of an argument's first word runs to the
/// argument's end (`--db-password=correct horse`, `PGPASSWORD=a b`, `-u
/// me:a b`, `-pa b`); a header's value, after `-H`, to its end; a quoted
/// value to its closing quote, within the argument. A shell's script (the
/// argument after `-c`) is read word by word: its first word may be an
/// assignment before a command (`sh -c "API_KEY=X run.sh"`).
pub fn redact_args<S: AsRef<str>>(args: &[S]) -> String {
    let mut out = String::new();
    let mut r = Redactor::default();
    for (i, arg) in args.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        r.argument(arg.as_ref(), &mut out);
    }
    out
}

/// The shell quote open after `tok`, given the one open before it: `'…'`
/// takes everything literally, `"…"` and bare words honour `\`. An
/// apostrophe outside quotes in a word of letters, followed by a letter
/// (`didn't`, `it's`, not `-p'pw`), is taken for prose, not a quote that
/// opens: in a script it would be a syntax error, in a flattened line it
/// is a message's.
fn quote_after(mut open: Option<char>, tok: &str) -> Option<char> {
    let mut chars = tok.chars().peekable();
    let mut prev = ' ';
    let mut letters = true; // the word so far is letters only
    while let Some(c) = chars.next() {
        match (open, c) {
            (Some('\''), '\'') => open = None,
            (Some('\''), _) => {}
            (_, '\\') => {
                chars.next();
            }
            (None, '\'')
                if letters
                    && prev.is_alphabetic()
                    && chars.peek().is_some_and(|n| n.is_alphabetic()) => {}
            (None, '"' | '\'') => open = Some(c),
            (Some('"'), '"') => open = None,
            _ => {}
        }
        letters &= c.is_alphabetic() || (c == '\'' && open.is_none());
        prev = c;
    }
    open
}

/// What the words read so far say about the next one.
struct Redactor {
    pending: Pending,
    /// The previous token was `-u` (this one may be `user:password`) or
    /// curl's `-x` (`user:password@proxy`): how to redact this one.
    credentials: Option<fn(&str) -> Option<String>>,
    /// The previous token ended with a sensitive name (`OpenAI(api_key`):
    /// a lone `=` or `:` makes the next token its value, as that name's
    /// (an Authorization's scheme kept, a Cookie's pairs), if the value is
    /// quoted or the name opened a quote (`"password = X"`); not a bare
    /// word after a bare name (`token : parse` is prose).
    /// The third: the name was a bare word that names a value by itself
    /// (see `names_a_value`), so the next word is its value even with no
    /// `=` between them.
    named: Option<(Pending, bool, bool)>,
    /// What a quoted value after `name =` is (see `Pending::Quoted`).
    quoted_as: Pending,
    tool: Option<Tool>,
    /// The previous argument was `-c` (a shell's, Python's): this one is a
    /// script.
    script_next: bool,
    /// The previous argument was `-H` or `--header`: this one is a header.
    header_next: bool,
    /// The shell quote open after the words read so far in this argument.
    quote: Option<char>,
    /// Where SQL's password clauses have got to.
    sql: SqlWord,
    /// Inside a script's `#` comment, to the end of its line: its quotes
    /// are no shell's.
    comment: bool,
    /// The pending value was named by a word of prose (`Password:`,
    /// `Bearer`), not an identifier or a header.
    prose: bool,
    /// The value this word redacted was such a one: it does not run on to
    /// where the quotes around it close.
    prose_value: bool,
    /// A word so far was `secret` or `put-parameter` (`az keyvault secret
    /// set --value X`, `aws ssm put-parameter --value X`).
    secret_context: bool,
    /// A flag so far reads a secret from standard input
    /// (`--password-stdin`, `--with-token`): a here-string's word is one.
    stdin_secret: bool,
    /// Where a `.netrc` line (`machine h login u password X`, `default
    /// login u password X`) has got to: 4 after `machine`, 3 after its
    /// host or `default`, 2 after `login`, 1 after its user; `password`
    /// then names the next word.
    netrc: u8,
    /// Reading the words of one argument of an argument vector (not a
    /// script): the shell split none of them, so none ends a command.
    in_argument: bool,
}

/// Where SQL's password clauses have got to: `ALTER USER ci WITH PASSWORD
/// 'X'`, `IDENTIFIED [WITH plugin] BY 'X'`, `SET PASSWORD FOR u = 'X'`.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
enum SqlWord {
    #[default]
    None,
    Identified,
    IdentifiedWith,
    AfterPassword,
    PasswordFor,
    PasswordUser,
}

impl Default for Redactor {
    fn default() -> Self {
        Redactor {
            pending: Pending::None,
            credentials: None,
            named: None,
            quoted_as: Pending::Value,
            tool: None,
            script_next: false,
            header_next: false,
            quote: None,
            sql: SqlWord::None,
            comment: false,
            secret_context: false,
            stdin_secret: false,
            netrc: 0,
            in_argument: false,
            prose: false,
            prose_value: false,
        }
    }
}

impl Redactor {
    /// Inside a value that runs on over words, to a quote or a bracket.
    fn inside_value(&self) -> bool {
        matches!(
            self.pending,
            Pending::UntilQuote(_) | Pending::UntilClose(..)
        )
    }

    /// Redacts one argument of an argument vector into `out` (see
    /// [`redact_args`]).
    fn argument(&mut self, arg: &str, out: &mut String) {
        let script = std::mem::take(&mut self.script_next);
        let header = std::mem::take(&mut self.header_next);
        // `sh -c -- SCRIPT`: the script is still to come.
        self.script_next = is_script_flag(arg) || (script && arg == "--");
        // An argument's quotes are its own.
        self.quote = None;
        self.comment = false;
        self.header_next = matches!(arg, "-H" | "--header" | "--proxy-header");
        self.in_argument = !script && arg.split_whitespace().nth(1).is_some();
        self.argument_words(arg, script, header, out);
        self.in_argument = false;
        // A quoted value ends with its argument at the latest.
        if self.inside_value() {
            self.pending = Pending::None;
        }
    }

    fn argument_words(&mut self, arg: &str, script: bool, header: bool, out: &mut String) {
        let lead = arg.len() - arg.trim_start().len();
        let first = arg.split_whitespace().next().unwrap_or("");
        let several = arg.split_whitespace().nth(1).is_some();
        if !several || script {
            self.words(arg, out);
            return;
        }
        if !is_flag_word(first) {
            match self.pending {
                Pending::Value | Pending::Cookie => {
                    out.push_str(REDACTED);
                    self.pending = Pending::None;
                    return;
                }
                Pending::Auth => {
                    if is_scheme(first) {
                        out.push_str(first);
                        out.push(' ');
                    }
                    out.push_str(REDACTED);
                    self.pending = Pending::None;
                    return;
                }
                Pending::Quoted
                | Pending::UntilQuote(_)
                | Pending::UntilClose(..)
                | Pending::None => {}
            }
        }
        // A header with a sensitive name (`-H "Authorization: Bearer X"`):
        // its value runs to the end of the argument, a scheme kept. Only
        // after `-H`, or for a header's name (`X-Api-Key:`): `auth: fix
        // login` in a message is prose.
        // `--header=X-Api-Key: X` is a header too.
        let (header, named) = match first
            .strip_prefix("--header=")
            .or_else(|| first.strip_prefix("--proxy-header="))
        {
            Some(h) => (true, h),
            None => (header, first),
        };
        if self.pending == Pending::None
            && let Some(name) = named.strip_suffix(':')
            && !name.is_empty()
            && name.chars().all(is_ident)
            && is_sensitive_name(name)
            && (header || is_header_name(name) || is_identifier(name))
        {
            let value = arg[lead + first.len()..].trim_start();
            out.push_str(&arg[..arg.len() - value.len()]);
            self.pending = pending_for(name);
            self.argument_words(value, false, false, out);
            return;
        }
        // `Authorization:Bearer X Y`: the scheme kept, the rest redacted
        // (not `auth:token refresh retries`, unless after `-H`).
        if self.pending == Pending::None
            && let Some((name, scheme)) = named.split_once(':')
            && name.chars().all(is_ident)
            && is_auth_name(name)
            && (header || is_header_name(name))
            && is_scheme(scheme)
        {
            out.push_str(&arg[..lead + first.len()]);
            out.push(' ');
            out.push_str(REDACTED);
            return;
        }
        // The first word, then: a value redacted to its end goes on to the
        // argument's end.
        out.push_str(&arg[..lead]);
        self.word(first, out);
        // A quoted value goes on to its closing quote, and what follows it
        // is read on (`{"password":"a b","model":"m"}`).
        if self.pending == Pending::None && out.ends_with(REDACTED) {
            self.named = None;
            self.credentials = None;
            return;
        }
        self.words(&arg[lead + first.len()..], out);
    }

    /// Redacts the whitespace-separated words of `s` into `out`, keeping
    /// the whitespace.
    fn words(&mut self, s: &str, out: &mut String) {
        let mut rest = s;
        while !rest.is_empty() {
            let ws = rest
                .find(|c: char| !c.is_whitespace())
                .unwrap_or(rest.len());
            // Inside a quoted value, its spaces go with it.
            if !self.inside_value() {
                out.push_str(&rest[..ws]);
            }
            if rest[..ws].contains('\n') {
                self.comment = false;
                // A new line of a script is a new command (outside quotes).
                if self.quote.is_none() && !self.inside_value() {
                    self.tool = None;
                    self.stdin_secret = false;
                    self.netrc = 0;
                }
            }
            rest = &rest[ws..];
            if rest.is_empty() {
                break;
            }
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            self.word(&rest[..end], out);
            rest = &rest[end..];
        }
    }

    /// Redacts one word into `out`, and follows a shell's quoting across
    /// words: a value redacted at the end of a word inside quotes that
    /// are still open goes on to where they close (`-H 'X-Api-Key: a b'`,
    /// `curl -u "me:a b"`, `mysql -p'a b'` in a script).
    fn word(&mut self, tok: &str, out: &mut String) {
        let before = out.len();
        let inside = self.inside_value();
        let open = self.quote;
        if self.quote.is_none() && !inside && tok.starts_with('#') {
            self.comment = true;
        }
        self.token(tok, out);
        if self.comment {
            return;
        }
        // A command ends at the shell's operators, or with a word ending
        // in `;`: where the shell reads them, outside quotes and not inside
        // one argument of an argument vector (`-H 'Content-Type: a; b'`).
        if open.is_none()
            && !self.in_argument
            && (is_command_end(tok) || (tok.len() > 1 && tok.ends_with(';')))
        {
            self.tool = None;
            self.stdin_secret = false;
            self.netrc = 0;
        }
        self.quote = quote_after(self.quote, tok);
        // A redaction that took a closing quote with it (`'don't` read as
        // one value, `'[REDACTED]`) gives the quote back, so that a second
        // pass tracks the quotes as this one did.
        if self.quote.is_none()
            && !inside
            && !self.inside_value()
            && let Some(q) = quote_after(open, &out[before..])
        {
            out.push(q);
        }
        if let Some(q) = self.quote
            && !inside
            && !self.prose_value
            && self.pending == Pending::None
            && !tok.contains(REDACTED)
            && out[before..].ends_with(REDACTED)
        {
            self.pending = Pending::UntilQuote(q);
        }
    }

    /// The rest of a word after a quoted value, from its closing quote:
    /// read on only if there is more than the quote and punctuation,
    /// which are no word of their own (such as a program's name).
    fn after_value(&mut self, rest: &str, out: &mut String) {
        if rest.chars().any(char::is_alphanumeric) {
            self.token(rest, out);
        } else {
            out.push_str(rest);
        }
    }

    /// Redacts one word into `out`.
    fn token(&mut self, tok: &str, out: &mut String) {
        if let Pending::UntilQuote(q) = self.pending {
            // The value goes on to its closing quote; what follows is read
            // as a word of its own (`horse","token":"X"}`).
            let chars: Vec<(usize, char)> = tok.char_indices().collect();
            if let Some(k) = closing_quote(&chars, 0, q) {
                self.pending = Pending::None;
                self.after_value(&tok[chars[k].0..], out);
            }
            return;
        }
        if let Pending::UntilClose(close, depth) = self.pending {
            let open = if close == ')' { '(' } else { '[' };
            let (end, depth) = closing_bracket(tok.chars(), open, close, depth);
            match end {
                Some(n) => {
                    self.pending = Pending::None;
                    let k = tok.char_indices().nth(n).map_or(tok.len(), |(b, _)| b);
                    self.after_value(&tok[k..], out);
                }
                None => self.pending = Pending::UntilClose(close, depth),
            }
            return;
        }
        // A here-string is no value itself (`--with-token <<< X`), and
        // after `--password-stdin` or `--with-token` its word is one.
        if let Some(rest) = tok.strip_prefix("<<<")
            && (self.pending != Pending::None || self.stdin_secret)
        {
            out.push_str("<<<");
            if self.pending == Pending::None {
                self.pending = Pending::Value;
            }
            if !rest.is_empty() {
                self.token(rest, out);
            }
            return;
        }
        let sql = std::mem::take(&mut self.sql);
        self.prose_value = false;
        if self.pending == Pending::None {
            self.prose = false;
        }
        // A flag is never a value: `--password-stdin -u me`. (A value
        // that merely starts with `-`, `-Xq7b…`, still is.)
        if self.pending != Pending::None && is_flag_word(tok) {
            self.pending = Pending::None;
            self.prose = false;
        }
        // `"name": "API_KEY", "value": "X"`: the value comes after its key.
        if matches!(self.pending, Pending::Value | Pending::Quoted) && is_json_key(tok) && {
            let k = tok
                .trim_end_matches(':')
                .trim_matches(['"', '\'', '\\', '{', ',']);
            k.eq_ignore_ascii_case("value")
        } {
            out.push_str(tok);
            return;
        }
        // Not a value but more of the structure: an object's brace or key
        // (`"auth": {"password": "X"}`, `"token": "secret":`; a value that
        // starts with `{` is a value: `-p {Zq9`), or
        // a build secret's spec (`--secret id=npmrc,src=.npmrc`).
        if matches!(
            self.pending,
            Pending::Value | Pending::Auth | Pending::Cookie
        ) && (tok == "{" || is_json_key(tok) || is_secret_spec(tok))
        {
            self.pending = Pending::None;
        }
        // The quote that closes a script's string before the value: in
        // `'Authorization: Bearer '"$TOKEN"` the value is what follows it.
        if matches!(
            self.pending,
            Pending::Value | Pending::Auth | Pending::Cookie
        ) && let Some(q) = self.quote
            && let Some(rest) = tok.strip_prefix(q)
            // Else the tracked quote went wrong (a heredoc's `runners'`)
            // and this one opens the value: read below.
            && (rest.is_empty() || rest.starts_with(['"', '$', '`']))
        {
            out.push(q);
            if rest.is_empty() {
                self.pending = Pending::None;
            } else {
                let quote = self.quote.take();
                self.token(rest, out);
                self.quote = quote;
            }
            return;
        }
        // After `api_key =`: only a quoted value (`"X"`), not a word
        // (`token : parse`).
        if self.pending == Pending::Quoted {
            self.pending = if tok.starts_with(['"', '\'']) {
                self.quoted_as
            } else {
                Pending::None
            };
        }
        if self.pending != Pending::None {
            // The name this value is for has had it.
            self.named = None;
            self.prose_value = std::mem::take(&mut self.prose);
            // A quoted value that does not close in this word goes on in
            // the next ones (`"password": "correct horse"`).
            if matches!(self.pending, Pending::Value | Pending::Cookie)
                && let Some(q) = tok.chars().next().filter(|c| matches!(c, '"' | '\''))
                && !tok.contains(REDACTED)
            {
                let chars: Vec<(usize, char)> = tok.char_indices().collect();
                match closing_quote(&chars, 1, q) {
                    None => {
                        out.push(q);
                        out.push_str(REDACTED);
                        self.pending = Pending::UntilQuote(q);
                        return;
                    }
                    // A quoted value and more after it in one word
                    // (`"X").models.list()`): the rest is read on.
                    Some(k) if k > 1 && self.pending == Pending::Value => {
                        out.push(q);
                        out.push_str(REDACTED);
                        self.pending = Pending::None;
                        self.after_value(&tok[chars[k].0..], out);
                        return;
                    }
                    Some(_) => {}
                }
            }
            if self.pending == Pending::Auth && is_scheme(tok) {
                out.push_str(tok);
                self.pending = Pending::Value;
                return;
            }
            if let Some(r) = redact_whole(tok) {
                out.push_str(&r);
                self.pending = if self.pending == Pending::Cookie && tok.ends_with(';') {
                    Pending::Cookie
                } else if self.pending == Pending::Auth && scheme_shaped(tok) {
                    // A scheme not in SCHEMES (`Api-Key`, `OAuth`, `SSWS`):
                    // redacted too, and the credential is the next word.
                    Pending::Value
                } else {
                    Pending::None
                };
                return;
            }
            out.push_str(tok);
            self.pending = Pending::None;
            return;
        }

        if sql == SqlWord::IdentifiedWith {
            // `IDENTIFIED WITH mysql_native_password BY 'X'`: a plugin.
            out.push_str(tok);
            self.sql = SqlWord::Identified;
            return;
        }
        if let Some((as_, opened_quote, bare)) = self.named.take() {
            if matches!(tok, "=" | ":") {
                out.push_str(tok);
                self.pending = if opened_quote {
                    as_
                } else {
                    self.quoted_as = as_;
                    Pending::Quoted
                };
                return;
            }
            if bare
                && !is_flag_word(tok)
                && let Some(r) = redact_whole(tok)
            {
                out.push_str(&r);
                return;
            }
        }
        // `htpasswd -b /etc/nginx/htpasswd u X`: the file is no new tool.
        let htpasswd_file = matches!(
            self.tool,
            Some(Tool::Htpasswd {
                no_file: false,
                seen: 0,
                value_next: false,
                ..
            })
        );
        if let Some(t) = Tool::named(tok)
            && !htpasswd_file
        {
            self.tool = Some(t);
        } else if let Some(t) = self.tool
            && !is_flag(tok)
        {
            self.tool = t.after(tok);
            if t.positional_secret(tok) {
                out.push_str(&redact_whole(tok).unwrap_or_else(|| REDACTED.to_string()));
                return;
            }
        } else if let Some(t) = self.tool {
            self.tool = Some(t.flag(tok));
        }
        if let Some(p) = self.tool.and_then(|t| t.takes_secret(tok)) {
            out.push_str(tok);
            self.pending = p;
            return;
        }
        if let Some(n) = self.tool.and_then(|t| t.attached_secret(tok)) {
            // Its quotes stay (`-p'pass word'` in a script).
            out.push_str(&tok[..n]);
            out.push_str(&redact_whole(&tok[n..]).unwrap_or_else(|| REDACTED.to_string()));
            return;
        }
        if tok == "--with-token" || (tok.starts_with("--") && tok.ends_with("-stdin")) {
            self.stdin_secret = true;
        }
        if self.secret_context && tok == "--value" {
            out.push_str(tok);
            self.pending = Pending::Value;
            return;
        }
        if self.secret_context
            && let Some(v) = tok.strip_prefix("--value=")
            && !v.is_empty()
        {
            out.push_str("--value=");
            out.push_str(REDACTED);
            return;
        }
        if is_flag(tok) && !tok.contains(['=', ':']) && is_sensitive_name(tok) {
            out.push_str(tok);
            self.pending = pending_for(tok);
            return;
        }
        // curl's `-uUSER:PASSWORD`, `--user=USER:PASSWORD`, `-U…`, and
        // `-xUSER:PASSWORD@proxy`.
        const USER: &[&str] = &["--user=", "--proxy-user=", "-u", "-U"];
        const PROXY: &[&str] = &["--proxy=", "--preproxy=", "-x"];
        let attached = |flags: &[&str], rule: fn(&str) -> Option<String>| {
            let value = flags
                .iter()
                .find_map(|f| tok.strip_prefix(f).filter(|v| !v.is_empty()))?;
            Some(format!(
                "{}{}",
                &tok[..tok.len() - value.len()],
                rule(value)?
            ))
        };
        // `--user=U:P` and `--proxy-user=U:P` whatever the tool (wget,
        // hurl, curl under another name); the short forms only for curl.
        let curl = self.tool == Some(Tool::Curl);
        if let Some(r) = attached(&USER[..2], user_password)
            .or_else(|| curl.then(|| attached(USER, user_password)).flatten())
            .or_else(|| curl.then(|| attached(PROXY, proxy_password)).flatten())
        {
            out.push_str(&r);
            return;
        }
        if let Some(r) = self.credentials.take().and_then(|rule| rule(tok)) {
            out.push_str(&r);
            return;
        }
        self.credentials = match tok {
            "-u" | "--user" | "--proxy-user" | "-U" => Some(user_password),
            "-a" if self.tool == Some(Tool::Httpie) => Some(user_password),
            "-x" | "--proxy" | "--preproxy" => Some(proxy_password),
            _ => None,
        };
        if self.credentials.is_some() {
            out.push_str(tok);
            return;
        }
        if is_long_hex(tok) || looks_random(tok) {
            out.push_str(&redact_whole(tok).unwrap_or_else(|| REDACTED.to_string()));
            return;
        }
        let (scanned, next) = scan_token(tok);
        out.push_str(&redact_key_shapes(&scanned));
        self.pending = next;
        // `Password:` or `Token:` in a message, not `api_key:` or a
        // header's `X-Api-Key:`: its value is a word, not the rest of a
        // quoted string (see `word`).
        let said = trailing_name(tok.trim_end_matches([':', '=']));
        self.prose = next != Pending::None && !is_identifier(said) && !is_header_name(said);
        if next == Pending::Quoted {
            self.quoted_as = Pending::Value;
        }
        let name = trailing_name(tok);
        self.named = (self.pending == Pending::None && !is_flag(tok) && is_sensitive_name(name))
            .then(|| {
                // Bare: the word is the name, quotes aside, or ends with it
                // after a path (`//registry.npmjs.org/:_authToken`).
                let bare = tok.ends_with(name)
                    && !tok.starts_with(['"', '\''])
                    && !tok.contains(['(', '[', '{'])
                    && names_a_value(name);
                (pending_for(name), tok.starts_with(['"', '\'']), bare)
            });
        let bare = tok.trim_matches(|c| c == '"' || c == '\'');
        if self.pending == Pending::None && bare.eq_ignore_ascii_case("bearer") {
            self.pending = Pending::Value;
            self.prose = true;
        }
        if self.pending == Pending::None {
            self.sql_word(sql, bare);
        }
        if matches!(tok, "secret" | "secrets" | "put-parameter") {
            self.secret_context = true;
        }
        self.netrc = match (self.netrc, bare) {
            (_, "machine") => 4,
            (4, _) | (_, "default") => 3,
            (3, "login") => 2,
            (2, _) => 1,
            (1 | 3, "password" | "passwd") => {
                if matches!(self.pending, Pending::None | Pending::Quoted) {
                    self.pending = Pending::Value;
                }
                0
            }
            _ => 0,
        };
    }

    /// SQL's password clauses (see [`SqlWord`]), after `word`.
    fn sql_word(&mut self, sql: SqlWord, word: &str) {
        let is = |w: &str| word.eq_ignore_ascii_case(w);
        let mut quoted_next = || {
            self.pending = Pending::Quoted;
            self.quoted_as = Pending::Value;
        };
        match sql {
            _ if is("password") => {
                quoted_next();
                self.sql = SqlWord::AfterPassword;
            }
            SqlWord::Identified if is("by") => quoted_next(),
            SqlWord::Identified if is("with") => self.sql = SqlWord::IdentifiedWith,
            SqlWord::AfterPassword if is("for") => self.sql = SqlWord::PasswordFor,
            SqlWord::PasswordFor => self.sql = SqlWord::PasswordUser,
            SqlWord::PasswordUser if word == "=" => quoted_next(),
            _ if is("identified") => self.sql = SqlWord::Identified,
            _ => {}
        }
    }
}

/// A JSON object's key by itself (`"token":`, `"secret":`): the next
/// word is its value, not the value of a key before it.
fn is_json_key(tok: &str) -> bool {
    let Some(inner) = tok
        .strip_suffix(':')
        .and_then(|t| t.strip_suffix(['"', '\'']))
        .map(|t| t.trim_end_matches('\\'))
    else {
        return false;
    };
    let name = inner.trim_start_matches(['"', '\'', '\\', '{', ',']);
    name.len() < inner.len() && !name.is_empty() && name.chars().all(is_ident)
}

/// A BuildKit secret's spec (`docker build --secret id=npmrc,src=.npmrc`,
/// `id=tok,env=TOKEN`): where the secret is, not what it is.
fn is_secret_spec(tok: &str) -> bool {
    (tok.starts_with("id=") || tok.starts_with("type="))
        && ["src=", "source=", "env="].iter().any(|k| tok.contains(k))
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
            "curl -H 'Authorization: Api-Key abcd1234.EfGhSECRET' https://app.example",
            &["abcd1234.EfGhSECRET"],
            &["https://app.example"],
        ),
        (
            "curl -H Authorization: OAuth 3f2a9c1e-7b4d-4e8a-9c2b-1d5e6f7a8b9c -d {}",
            &["3f2a9c1e-7b4d-4e8a-9c2b-1d5e6f7a8b9c"],
            &["-d {}"],
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
        // `name=value` at the start of an argument: the shell's quoting is
        // gone, so the value runs to the argument's end, `;`, `,`, `)` and
        // all.
        (
            "mysql --password=Ab3;xY9)zQ!w db",
            &["Ab3", "xY9", "zQ!w"],
            &["--password=", " db"],
        ),
        (
            "tool --api-key=k1,k2-secondkeypart run",
            &["k1", "secondkeypart"],
            &["--api-key=", " run"],
        ),
        (
            "psql \"host=db password=Pa,ss&word\" -c x",
            &["Pa,", "ss&word"],
            &["\"host=db password=", "\" -c x"],
        ),
        // Short flags of tools that take a password with them.
        (
            "docker login -u me -p hunter2-correct-horse registry.example.com",
            &["hunter2-correct-horse"],
            &["-u me -p ", " registry.example.com"],
        ),
        (
            "az login --service-principal -u app-id -p abc8Q~xyzSECRETpart --tenant t",
            &["abc8Q~xyzSECRETpart"],
            &["-p ", " --tenant t"],
        ),
        (
            "sshpass -p Hunter2secret ssh -p 2222 host",
            &["Hunter2secret"],
            &["sshpass -p ", " ssh -p 2222 host"],
        ),
        (
            "sshpass -pHunter2secret ssh host",
            &["Hunter2secret"],
            &["sshpass -p", " ssh host"],
        ),
        (
            "redis-cli -a Hunter2secret ping",
            &["Hunter2secret"],
            &["redis-cli -a ", " ping"],
        ),
        (
            "mysql -uroot -pHunter2secret db",
            &["Hunter2secret"],
            &["mysql -uroot -p", " db"],
        ),
        (
            "twine upload -u __token__ -p pypi-AgEIcHlwaS5vcmcSECRETpart dist/x.whl",
            &["AgEIcHlwaS5vcmcSECRETpart"],
            &["-u __token__ -p ", " dist/x.whl"],
        ),
        (
            "x pypi-AgEIcHlwaS5vcmcSECRETpart",
            &["AgEIcHlwaS5vcmcSECRETpart"],
            &["x "],
        ),
        (
            "curl -uci:Hunter2secret https://h",
            &["Hunter2secret"],
            &["curl -uci:", " https://h"],
        ),
        (
            "curl --user=ci:Hunter2secret --proxy-user=p:Hunter3secret https://h",
            &["Hunter2secret", "Hunter3secret"],
            &["--user=ci:", "--proxy-user=p:", " https://h"],
        ),
        (
            "curl -x u:Hunter2secret@proxy.internal:8080 https://h",
            &["Hunter2secret"],
            &["-x u:", "@proxy.internal:8080 https://h"],
        ),
        (
            "curl -b sid=Hunter2secret https://h",
            &["Hunter2secret"],
            &["curl -b ", " https://h"],
        ),
        (
            "gh secret set DB_PASSWORD --body Hunter2secret --repo o/r",
            &["Hunter2secret"],
            &["gh secret set DB_PASSWORD --body ", " --repo o/r"],
        ),
        (
            "python -c OpenAI(api_key = \"Hunter2secret\")",
            &["Hunter2secret"],
            &["OpenAI(api_key = \""],
        ),
        // A value that starts with `-` but is no flag.
        (
            "tool --api-key -Xq7bT2mN9vLc4RzW8kPd3HsY6fJg run",
            &["Xq7bT2mN9vLc4RzW8kPd3HsY6fJg"],
            &["--api-key ", " run"],
        ),
        ("tool --password -p4ssW0rd! run", &["p4ssW0rd!"], &[" run"]),
        (
            "az login -u x -p -StartDash9",
            &["StartDash9"],
            &["-u x -p "],
        ),
        // Attached and `=` forms of the tools' flags.
        (
            "gh secret set X --body=Hunter2secret",
            &["Hunter2secret"],
            &["--body="],
        ),
        (
            "gh secret set X -bHunter2secret",
            &["Hunter2secret"],
            &["-b"],
        ),
        (
            "docker login -p=Hunter2secret r.io",
            &["Hunter2secret"],
            &["-p=", " r.io"],
        ),
        (
            "twine upload -pHunter2secret dist",
            &["Hunter2secret"],
            &["-p", " dist"],
        ),
        (
            "curl -bsid=Hunter2secret https://h",
            &["Hunter2secret"],
            &["curl -b"],
        ),
        (
            "curl -Uu:Hunter2secret https://h",
            &["Hunter2secret"],
            &["-Uu:"],
        ),
        (
            "curl -xu:Hunter2secret@proxy:8080 https://h",
            &["Hunter2secret"],
            &["-xu:", "@proxy:8080"],
        ),
        // `name=value` after a flag's `=`: the value runs to the end too.
        (
            "kubectl create secret generic s --from-literal=password=Pa,ssHunter",
            &["Pa,", "ssHunter"],
            &["--from-literal=password="],
        ),
        // Quoted, a name and its value with spaces about `=` or `:`.
        (
            "echo \"password = Hunter2secret\" >> ~/.pypirc",
            &["Hunter2secret"],
            &["echo \"password = "],
        ),
        (
            "curl -H \"Authorization : Basic dXNlcjpwYXNzd2Q\" https://h",
            &["dXNlcjpwYXNzd2Q"],
            &["Authorization : Basic "],
        ),
        // curl on Windows runners; --user= for any tool.
        (
            "curl.exe -ualice:Hunter2secret https://h",
            &["Hunter2secret"],
            &["-ualice:"],
        ),
        (
            "wget --user=alice:Hunter2secret https://h",
            &["Hunter2secret"],
            &["--user=alice:"],
        ),
        // `#` and `?` in a URL's password.
        (
            "mysql mysql://root:Pa#ssHunter@db:3306/app",
            &["Pa#ssHunter", "ssHunter"],
            &["mysql://root:", "@db:3306/app"],
        ),
        (
            "redis-cli -u redis://:p?wHunter@host",
            &["wHunter"],
            &["@host"],
        ),
        // A URL's user info: a token alone, a password with `/` in it.
        (
            "git clone https://h2xkqv7aalongpersonaltoken4z@dev.azure.com/org/p",
            &["h2xkqv7aalongpersonaltoken4z"],
            &["git clone https://", "@dev.azure.com/org/p"],
        ),
        (
            "psql postgres://u:pa/ssHunter@db/x",
            &["pa/ssHunter", "ssHunter"],
            &["postgres://u:", "@db/x"],
        ),
        // Code that sets a key: subscripts, calls, quoted names.
        (
            "python -c import os;os.environ['AZURE_OPENAI_API_KEY']='0123456789abcdef';main()",
            &["0123456789abcdef"],
            &["os.environ['AZURE_OPENAI_API_KEY']='", "';main()"],
        ),
        (
            "node -e process.env[\"MISTRAL_API_KEY\"]=\"Hunter2secret\";run()",
            &["Hunter2secret"],
            &["process.env[\"MISTRAL_API_KEY\"]="],
        ),
        (
            "ruby -e ENV['OPENAI_API_KEY']='mysecretkey123';x",
            &["mysecretkey123"],
            &["ENV['OPENAI_API_KEY']="],
        ),
        (
            "python -c os.environ.setdefault('OPENAI_API_KEY','mysecretkey123')",
            &["mysecretkey123"],
            &["setdefault('OPENAI_API_KEY','"],
        ),
        (
            "python -c os.putenv('OPENAI_API_KEY', 'mysecretkey123'); main()",
            &["mysecretkey123"],
            &["os.putenv('OPENAI_API_KEY',", "main()"],
        ),
        (
            "python -c os.environ['OPENAI_API_KEY'] = 'mysecretkey123'",
            &["mysecretkey123"],
            &["os.environ['OPENAI_API_KEY'] = "],
        ),
        (
            "python -c x = {\"api_key\" : \"mysecretkey123\"}",
            &["mysecretkey123"],
            &["{\"api_key\" : "],
        ),
        // A name written as an identifier, its value the next word.
        (
            "papermill in.ipynb out.ipynb -p openai_api_key Tr0ub4dor-and-3 -p n 5",
            &["Tr0ub4dor-and-3"],
            &["-p openai_api_key ", " -p n 5"],
        ),
        (
            "yarn config set npmAuthToken mysecretkey123",
            &["mysecretkey123"],
            &["npmAuthToken "],
        ),
        (
            "npm config set //registry.npmjs.org/:_authToken mysecretkey123",
            &["mysecretkey123"],
            &["//registry.npmjs.org/:_authToken "],
        ),
        (
            "aws configure set aws_secret_access_key lowercaseonlysecret",
            &["lowercaseonlysecret"],
            &["aws_secret_access_key "],
        ),
        // Passphrases.
        (
            "python eval.py --passphrase correcthorse",
            &["correcthorse"],
            &["--passphrase "],
        ),
        (
            "mvn deploy -Dgpg.passphrase=correcthorse",
            &["correcthorse"],
            &["-Dgpg.passphrase="],
        ),
        (
            "env GPG_PASSPHRASE=correcthorse make",
            &["correcthorse"],
            &["GPG_PASSPHRASE=", " make"],
        ),
        // A quoted value runs to its closing quote, past `,` and `;`, an
        // escaped quote and a quote inside a word.
        (
            "python -c OpenAI(api_key='Zq9,SECRET;zq9') run",
            &["SECRET", "zq9"],
            &["OpenAI(api_key='[REDACTED]') run"],
        ),
        (
            "tool --password \"Zq9\\\"SECRET zq9\" run",
            &["SECRET", "zq9"],
            &["--password \"[REDACTED]\" run"],
        ),
        (
            "tool --password 'don't tell' run",
            &["tell"],
            &["--password '[REDACTED]' run"],
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
            // A sensitive flag with no value does not take the next flag.
            "docker login --password-stdin -u me registry.example.com",
            "python train.py --use_auth_token --model_name_or_path bert",
            "tool --no-auth --model gpt-4o",
            // Names of a secret's limits, ids, names and files are not it.
            "tool --token-limit 4096 --token-budget 50000 --key-id 3",
            "aws secretsmanager get-secret-value --secret-name prod/openai",
            "tool --api-key-file /etc/keys/openai --password-file pw.txt",
            // `-p` is a port or a prompt for these.
            "mysql -p db",
            "psql -h db -p 5432 -U me",
            "redis-cli -h cache -p 6379 ping",
            "docker run -p 8080:80 -v /a:/b nginx",
            "ssh -p 2222 runner@host",
            // uid:gid, not user:password.
            "docker run -u 1000:1000 --user=1000:1000 img",
            "docker run --user=app img",
            // A name, a lone `=` or `:`, and a word that is not quoted.
            "git commit -m token : parse",
            "tool --token -- run",
            "echo fix: key = lookup",
            // User info that is no secret, `@` in paths and queries, ports.
            "curl https://api.example.com?email=user1234567890abcdef@example.com",
            "npm install https://registry.npmjs.org/@types/node",
            "curl https://host.example.com:8443/api/@scope/pkg",
            "git clone https://git@github.com/o/r",
            "docker pull ubuntu:22.04@sha256:0123abcd",
            // A variable's name in capitals passed by name, not a value;
            // a call that passes a variable, not a literal.
            "env -u OPENAI_API_KEY python run.py",
            "docker run -e OPENAI_API_KEY myimage",
            "python -c os.putenv('OPENAI_API_KEY', key)",
            // An identifier that names something else.
            "pytest -k test_token_refresh tests/unit",
            "",
            "   ",
        ] {
            assert_eq!(redact_cmdline(s), s);
        }
    }

    /// (argument vector, secrets that must not survive, text that must
    /// survive): values with spaces in one argument.
    const ARGS: &[(&[&str], &[&str], &[&str])] = &[
        // A sensitive name that is no word of prose, first in an
        // argument: the rest of it is the value.
        (
            &["echo", "db_password: correct horse battery staple"],
            &["correct", "horse", "battery", "staple"],
            &["echo db_password: "],
        ),
        // A quoted value that closes within the argument: what follows is
        // read on.
        (
            &[
                "curl",
                "-d",
                "{\"password\":\"correct horse\",\"model\":\"gpt-4o\"}",
            ],
            &["correct", "horse"],
            &["\"model\":\"gpt-4o\"}"],
        ),
        (
            &["curl", "--header=X-Api-Key: correct horse", "https://h"],
            &["correct", "horse"],
            &["--header=X-Api-Key: ", " https://h"],
        ),
        (
            &[
                "curl",
                "-H",
                "Authorization:Bearer correct horse",
                "https://h",
            ],
            &["correct", "horse"],
            &["-H Authorization:Bearer ", " https://h"],
        ),
        (
            &[
                "curl",
                "--proxy-header=Proxy-Authorization: Basic correct horse",
                "https://h",
            ],
            &["correct", "horse"],
            &["Proxy-Authorization: Basic ", " https://h"],
        ),
        // A JSON value that ends in an escaped backslash closes there.
        (
            &[
                "curl",
                "-d",
                "{\"client_secret\":\"Zq9\\\\\",\"refresh_token\":\"SECRETrefresh\"}",
                "https://h",
            ],
            &["Zq9", "SECRETrefresh"],
            &["\"refresh_token\":\"[REDACTED]\"}"],
        ),
        // In a shell's single quotes a backslash is a backslash, and
        // `'\''` puts a quote in the value.
        (
            &["sh", "-c", "PGPASSWORD='Zq9\\' psql -h db -c 'select 1'"],
            &["Zq9"],
            &["psql -h db -c 'select 1'"],
        ),
        (
            &["sh", "-c", "PGPASSWORD='it'\\''s a secret' psql -h db"],
            &["secret"],
            &["psql -h db"],
        ),
        // In a script, a value redacted inside quotes goes on to where
        // they close, whatever rule found it.
        (
            &[
                "sh",
                "-c",
                "curl -H 'X-Api-Key: correct horse' -u \"me:battery staple\" https://h && echo done",
            ],
            &["correct", "horse", "battery", "staple"],
            &["curl -H 'X-Api-Key: [REDACTED]' -u \"me:[REDACTED]\" https://h && echo done"],
        ),
        (
            &["bash", "-c", "mysql -p'correct horse' db < dump.sql"],
            &["correct", "horse"],
            &["mysql -p'[REDACTED]' db < dump.sql"],
        ),
        // SQL's password clauses.
        (
            &[
                "psql",
                "-c",
                "ALTER USER ci WITH PASSWORD 'correct horse'; SELECT 1",
            ],
            &["correct", "horse"],
            &["PASSWORD '[REDACTED]'; SELECT 1"],
        ),
        (
            &[
                "mysql",
                "-e",
                "CREATE USER ci IDENTIFIED BY 'correct horse'",
            ],
            &["correct", "horse"],
            &["IDENTIFIED BY '[REDACTED]'"],
        ),
        (
            &["python3", "eval.py", "--db-password=correct horse battery"],
            &["correct", "horse", "battery"],
            &["python3 eval.py --db-password="],
        ),
        (
            &["tool", "--password", "two words", "--model", "m"],
            &["two", "words"],
            &["tool --password ", " --model m"],
        ),
        (
            &["curl", "-H", "Authorization: Bearer abc def", "https://h"],
            &["abc", "def"],
            &["Authorization: Bearer ", " https://h"],
        ),
        (
            &["tool", "--authorization", "Bearer abc def"],
            &["abc", "def"],
            &["--authorization Bearer "],
        ),
        (
            &["psql", "password=my secret pw host=db"],
            &["my", "secret", "pw"],
            &["psql password="],
        ),
        (
            &["mvn", "-Dgpg.passphrase=two words", "deploy"],
            &["two", "words"],
            &["-Dgpg.passphrase=", " deploy"],
        ),
        (
            &[
                "kubectl",
                "create",
                "secret",
                "generic",
                "s",
                "--from-literal=password=Tr0ub4dor horsebattery",
            ],
            &["Tr0ub4dor", "horsebattery"],
            &["--from-literal=password="],
        ),
        (
            &["curl", "-b", "a=Tr0ub4dor; b=horsebattery", "https://h"],
            &["Tr0ub4dor", "horsebattery"],
            &["curl -b ", " https://h"],
        ),
        // A quoted value with spaces inside one argument.
        (
            &[
                "curl",
                "-d",
                "{\"password\": \"correct horse battery staple\", \"model\": \"m\"}",
                "https://h",
            ],
            &["correct", "horse", "battery", "staple"],
            &[
                "{\"password\": \"[REDACTED]\", \"model\": \"m\"}",
                " https://h",
            ],
        ),
        (
            &["sh", "-c", "PGPASSWORD='correct horse' psql -h db"],
            &["correct", "horse"],
            &["PGPASSWORD='[REDACTED]' psql -h db"],
        ),
        (
            &[
                "python",
                "-c",
                "OpenAI(api_key='my secret key').models.list()",
            ],
            &["my", "secret", "key'"],
            &["OpenAI(api_key='[REDACTED]').models.list()"],
        ),
        // Whatever rule redacts an argument's first word to its end.
        (
            &["env", "PGPASSWORD=correct horse battery", "psql"],
            &["correct", "horse", "battery"],
            &["env PGPASSWORD=[REDACTED] psql"],
        ),
        (
            &["docker", "run", "-e", "DB_PASSWORD=correct horse", "img"],
            &["correct", "horse"],
            &["-e DB_PASSWORD=[REDACTED] img"],
        ),
        (
            &["curl", "-u", "me:correct horse", "https://h"],
            &["correct", "horse"],
            &["-u me:[REDACTED] https://h"],
        ),
        (
            &["sshpass", "-pcorrect horse", "ssh", "h"],
            &["correct", "horse"],
            &["-p[REDACTED] ssh h"],
        ),
        (
            &[
                "papermill",
                "a.ipynb",
                "b.ipynb",
                "-p",
                "db_password",
                "correct horse battery",
            ],
            &["correct", "horse", "battery"],
            &["-p db_password [REDACTED]"],
        ),
    ];

    /// Each argument vector keeps none of its secrets and all of its kept
    /// text.
    fn assert_args_redacted(cases: &[(&[&str], &[&str], &[&str])]) {
        for (args, secrets, kept) in cases {
            let out = redact_args(args);
            for s in *secrets {
                assert!(
                    !out.contains(s),
                    "secret `{s}` survived in `{out}` (from {args:?})"
                );
            }
            for k in *kept {
                assert!(out.contains(k), "`{k}` lost in `{out}` (from {args:?})");
            }
        }
    }

    #[test]
    fn secrets_by_their_place_here_strings_dsns_and_tuples() {
        let pw = "Zq9hunter2x";
        assert_args_redacted(&[
            // htpasswd's password is its last positional word in batch
            // mode, and its file may be called htpasswd.
            (
                &["htpasswd", "-b", "/etc/nginx/htpasswd", "ci", pw],
                &[pw],
                &["/etc/nginx/htpasswd ci "],
            ),
            (&["htpasswd", "-nbB", "ci", pw], &[pw], &["-nbB ci "]),
            (
                &["htpasswd", "-bc", "-C", "12", "f", "ci", pw],
                &[pw],
                &["-C 12 f ci "],
            ),
            // Without -b, htpasswd prompts: nothing to redact.
            (&["htpasswd", "-c", "f", "ci"], &[], &["htpasswd -c f ci"]),
            (
                &[
                    "sh",
                    "-c",
                    "htpasswd -nb ci Zq9hunter2x; htpasswd -b f ci Zq9other22",
                ],
                &[pw, "Zq9other22"],
                &["-nb ci ", "; htpasswd -b f ci "],
            ),
            // A here-string after a flag that reads stdin.
            (
                &[
                    "bash",
                    "-c",
                    "gh auth login --with-token <<< ghx_Zq9hunter2x",
                ],
                &[pw],
                &["--with-token <<< "],
            ),
            (
                &[
                    "bash",
                    "-c",
                    "docker login -u me --password-stdin <<<'Zq9hunter2x' reg.io",
                ],
                &[pw],
                &["<<<'", "' reg.io"],
            ),
            (
                &["bash", "-c", "grep -c x <<< \"$LOG\""],
                &[],
                &["grep -c x <<< \"$LOG\""],
            ),
            // A .netrc line, and mysqladmin's password command.
            (
                &[
                    "bash",
                    "-c",
                    "echo 'machine github.com login ci password Zq9hunter2x' > ~/.netrc",
                ],
                &[pw],
                &["machine github.com login ci password ", "' > ~/.netrc"],
            ),
            (
                &["mysqladmin", "-u", "root", "password", pw],
                &[pw],
                &["-u root password "],
            ),
            (
                &["mysqladmin", "-pZq9hunter2x", "status"],
                &[pw],
                &["status"],
            ),
            // redis-cli's AUTH, to the command's end, and CONFIG SET.
            (
                &["redis-cli", "AUTH", "default", pw],
                &["default", pw],
                &["redis-cli AUTH "],
            ),
            (
                &["sh", "-c", "redis-cli auth Zq9hunter2x && redis-cli ping"],
                &[pw],
                &[" && redis-cli ping"],
            ),
            (
                &["redis-cli", "CONFIG", "SET", "requirepass", pw],
                &[pw],
                &["CONFIG SET requirepass "],
            ),
            (&["redis-cli", "GET", "user:42"], &[], &["GET user:42"]),
            // SQL's PASSWORD('X').
            (
                &["mysql", "-e", "SET PASSWORD = PASSWORD('Zq9hunter2x')"],
                &[pw],
                &["SET PASSWORD = PASSWORD('"],
            ),
            // A tuple or list value, in one word or several.
            (
                &[
                    "python",
                    "-c",
                    "requests.get(u, auth=('ci', 'Zq9hunter2x'))",
                ],
                &[pw],
                &["requests.get(u, auth=(", "))"],
            ),
            (
                &[
                    "python",
                    "-c",
                    "requests.get(u,auth=('ci','correcthorse'),timeout=5)",
                ],
                &["correcthorse"],
                &["get(u,auth=(", "),timeout=5)"],
            ),
            (
                &["bash", "-c", "API_TOKEN=(Zq9hunter2x b) && run"],
                &[pw],
                &[") && run"],
            ),
            // Go's MySQL DSNs have no scheme.
            (
                &[
                    "app",
                    "--dsn",
                    "ci:Zq9hunter2x@tcp(db:3306)/app?parseTime=true",
                ],
                &[pw],
                &["ci:", "@tcp(db:3306)/app?parseTime=true"],
            ),
            (
                &[
                    "bash",
                    "-c",
                    "DSN='ci:Zq9hunter2x@unix(/run/mysqld.sock)/app' go test ./...",
                ],
                &[pw],
                &["DSN='ci:", "@unix(/run/mysqld.sock)/app' go test ./..."],
            ),
            (
                &[
                    "migrate",
                    "-database",
                    "mysql://ci:Zq9hunter2x@tcp(db:3306)/app",
                ],
                &[pw],
                &["mysql://ci:", "@tcp(db:3306)/app"],
            ),
            (&["ssh", "git@tcp(x)"], &[], &["git@tcp(x)"]),
            // A password with `=`, `,`, quotes or `@` in it: the user is
            // the first name a `:` follows, the `@` the one before `tcp(`.
            (
                &["app", "--dsn", "ci:Zq9hunter2xQ==@tcp(db:3306)/app"],
                &["Zq9hunter2xQ=="],
                &["ci:", "@tcp(db:3306)/app"],
            ),
            (
                &["bash", "-c", "DB_DSN='ci:pa=ss,w;o@rd@tcp(db)/app' ./run"],
                &["pa=ss", "w;o@rd"],
                &["DB_DSN='ci:", "@tcp(db)/app' ./run"],
            ),
            // Nested brackets inside a tuple.
            (
                &[
                    "python",
                    "-c",
                    "requests.get(u, auth=(user(), 'correcthorse'))",
                ],
                &["correcthorse"],
                &["auth=(", "))"],
            ),
            (
                &[
                    "python",
                    "-c",
                    "f(auth=(os.getenv('U'), 'correcthorse'), timeout=5)",
                ],
                &["correcthorse"],
                &["), timeout=5)"],
            ),
            (
                &["python", "-c", "f(auth=(a, g(b), 'correcthorse'))"],
                &["correcthorse"],
                &["f(auth=("],
            ),
            // A `;` inside one argument, or inside quotes, ends no command:
            // the tool's flags still take their secrets after it.
            (
                &[
                    "mysql",
                    "-u",
                    "root",
                    "-e",
                    "CREATE DATABASE app;",
                    "-phunter2pass",
                ],
                &["hunter2pass"],
                &["CREATE DATABASE app; -p"],
            ),
            (
                &[
                    "curl",
                    "-H",
                    "Content-Type: text/plain; charset=utf-8",
                    "-b",
                    "sid=hunter2pass",
                    "https://x",
                ],
                &["hunter2pass"],
                &["charset=utf-8 -b "],
            ),
            (
                &[
                    "sh",
                    "-c",
                    "curl -H 'Content-Type: text/plain; charset=utf-8' -b sid=hunter2pass https://x",
                ],
                &["hunter2pass"],
                &["charset=utf-8' -b "],
            ),
            // A new line of a script is a new command: htpasswd's counting
            // ends there, and a later tool is read as itself.
            (
                &[
                    "sh",
                    "-c",
                    "htpasswd -b /etc/nginx/htpasswd ci Zq9hunter2x\ndocker login -u me -p hunter2pass reg.io",
                ],
                &[pw, "hunter2pass"],
                &["docker login -u me -p "],
            ),
            (
                &[
                    "sh",
                    "-c",
                    "htpasswd -c f ci\ndocker login -u me -p hunter2pass reg.io",
                ],
                &["hunter2pass"],
                &["htpasswd -c f ci\n"],
            ),
            // An all-digit password is one unless it is -C's or -r's value.
            (
                &["htpasswd", "-nb", "ci", "12345678"],
                &["12345678"],
                &["-nb ci "],
            ),
            (
                &["htpasswd", "-nbC", "12", "ci", pw],
                &[pw],
                &["-nbC 12 ci "],
            ),
            // No over-redaction once the command has ended.
            (
                &["sh", "-c", "redis-cli ping\necho auth done\nmake test"],
                &[],
                &["echo auth done\nmake test"],
            ),
            (
                &["sh", "-c", "redis-cli auth Zq9hunter2x\nnpm test"],
                &[pw],
                &["\nnpm test"],
            ),
            (
                &[
                    "sh",
                    "-c",
                    "docker login --password-stdin <<< \"$P\"; grep -c x <<< hello",
                ],
                &[],
                &["grep -c x <<< hello"],
            ),
            (
                &[
                    "sh",
                    "-c",
                    "mysqladmin -u root password Zq9hunter2x && echo done",
                ],
                &[pw],
                &[" && echo done"],
            ),
            // A login and a password in prose are no .netrc line.
            (
                &["git", "commit", "-m", "fix login form password field"],
                &[],
                &["fix login form password field"],
            ),
            (
                &[
                    "sh",
                    "-c",
                    "printf 'default login ci password Zq9hunter2x\\n' > ~/.netrc",
                ],
                &[pw],
                &["default login ci password "],
            ),
            // SonarQube's login is a token whatever its shape.
            (
                &["sonar-scanner", "-Dsonar.login=Zq9hunter2x"],
                &[pw],
                &["-Dsonar.login="],
            ),
        ]);
    }

    #[test]
    fn an_argument_with_spaces_is_one_value() {
        assert_args_redacted(ARGS);
        // Each argument of the harmless kind is kept, and a shell command
        // that starts with a variable in capitals keeps its command.
        for (args, joined) in [
            (
                &["python", "train.py", "--max-tokens", "100"][..],
                "python train.py --max-tokens 100",
            ),
            (
                &["sh", "-c", "exec python run.py --model gpt-4o"][..],
                "sh -c exec python run.py --model gpt-4o",
            ),
            (
                &["git", "commit", "-m", "fix: parse the token limit"][..],
                "git commit -m fix: parse the token limit",
            ),
        ] {
            assert_eq!(redact_args(args), joined);
        }
        for args in [
            &["sh", "-c", "OPENAI_API_KEY=Hunter2secret python run.py"][..],
            &["bash", "-cex", "OPENAI_API_KEY=Hunter2secret python run.py"][..],
            &["bash", "-ce", "OPENAI_API_KEY=Hunter2secret python run.py"][..],
            &[
                "sh",
                "-c",
                "--",
                "OPENAI_API_KEY=Hunter2secret python run.py",
            ][..],
        ] {
            let out = redact_args(args);
            assert!(!out.contains("Hunter2secret"), "{out}");
            assert!(out.contains("python run.py"), "{out} from {args:?}");
        }
        // A script's words are words: its command survives an assignment.
        let out = redact_args(&[
            "sh",
            "-c",
            "token=$(cat /run/secrets/t); python -m pytest tests",
        ]);
        assert!(out.contains("python -m pytest tests"), "{out}");
        // Prose that starts with a sensitive word and a colon is not a
        // header: more than its next words survive.
        let out = redact_args(&[
            "aider",
            "--message",
            "auth: migrate the login form to OAuth2",
        ]);
        assert!(out.contains("login form to OAuth2"), "{out}");
        // A word with a colon that starts a message is prose, however
        // sensitive: only the word after it may go.
        for (args, kept) in [
            (
                &[
                    "git",
                    "commit",
                    "-m",
                    "Password: minimum length is now 12 characters",
                ][..],
                "length is now 12 characters",
            ),
            (
                &[
                    "gh",
                    "pr",
                    "create",
                    "--title",
                    "hotkey: add ctrl+s to save",
                ][..],
                "to save",
            ),
            (
                &[
                    "git",
                    "commit",
                    "-m",
                    "auth:token refresh now retries on 401",
                ][..],
                "now retries on 401",
            ),
        ] {
            let out = redact_args(args);
            assert!(out.contains(kept), "{out} from {args:?}");
        }
        // A quoted value and more in its word: the rest is kept, and a
        // second pass changes nothing.
        for line in [
            "python -c client = OpenAI(api_key = \"abc123\").models.list(); print(1) and more",
            "tool --token \"abc123\",next and more",
        ] {
            let out = redact_cmdline(line);
            assert!(!out.contains("abc123"), "{out}");
            assert!(
                out.contains("\").models.list(); print(1) and more")
                    || out.contains("\",next and more"),
                "{out}"
            );
            assert_eq!(redact_cmdline(&out), out);
        }
        // A descriptor's number is no secret.
        assert_eq!(
            redact_args(&["gpg", "--passphrase-fd", "0", "--batch"]),
            "gpg --passphrase-fd 0 --batch"
        );
    }

    /// What real CI steps pass (found by a review): secrets in scripts'
    /// escaped JSON, nested objects, SQL, comments, second URLs, template
    /// literals and the flags of more tools.
    const CI_STEPS: &[(&[&str], &[&str], &[&str])] = &[
        (
            &[
                "bash",
                "-c",
                "curl -d \"{\\\"password\\\":\\\"Zq9SECRET\\\"}\" https://h",
            ],
            &["Zq9SECRET"],
            &["https://h"],
        ),
        (
            &["curl", "-d", "{\"auth\": {\"password\": \"Zq9SECRET\"}}"],
            &["Zq9SECRET"],
            &["{\"auth\": {\"password\": "],
        ),
        (
            &[
                "mysql",
                "-e",
                "ALTER USER 'root'@'localhost' IDENTIFIED WITH mysql_native_password BY 'Zq9 SECRET'",
            ],
            &["Zq9", "SECRET"],
            &["mysql_native_password BY '[REDACTED]'"],
        ),
        (
            &["mysql", "-e", "SET PASSWORD FOR 'ci'@'%' = 'Zq9SECRET'"],
            &["Zq9SECRET"],
            &["SET PASSWORD FOR 'ci'@'%' = "],
        ),
        (
            &[
                "bash",
                "-e",
                "-c",
                "# don't print the password\ncurl -u 'ci:correct horse' https://h",
            ],
            &["correct", "horse"],
            &["https://h"],
        ),
        (
            &[
                "curl",
                "-d",
                "{\"ok\":\"https://a.example/cb\",\"db\":\"postgres://ci:Zq9SECRET@db/app\"}",
            ],
            &["Zq9SECRET"],
            &["https://a.example/cb", "@db/app"],
        ),
        (
            &[
                "node",
                "-e",
                "fetch(u, {headers: {Authorization: `Bearer Zq9SECRET`}})",
            ],
            &["Zq9SECRET"],
            &["Authorization: `Bearer "],
        ),
        (
            &[
                "keytool",
                "-importkeystore",
                "-srcstorepass",
                "Zq9SECRET",
                "-deststorepass",
                "Zq9OTHER",
            ],
            &["Zq9SECRET", "Zq9OTHER"],
            &["-srcstorepass ", "-deststorepass "],
        ),
        (
            &[
                "skopeo",
                "copy",
                "--src-creds",
                "ci:Zq9SECRET",
                "docker://a",
                "docker://b",
            ],
            &["Zq9SECRET"],
            &["docker://a docker://b"],
        ),
        (
            &[
                "vault",
                "write",
                "auth/approle/login",
                "role_id=r1",
                "secret_id=Zq9SECRET",
            ],
            &["Zq9SECRET"],
            &["role_id=r1 secret_id="],
        ),
        (
            &["npm", "config", "set", "_auth", "Zq9SECRET"],
            &["Zq9SECRET"],
            &["npm config set _auth "],
        ),
        (
            &["env", "GITHUB_PAT=Zq9SECRET", "make"],
            &["Zq9SECRET"],
            &["GITHUB_PAT=", " make"],
        ),
        (
            &["oc", "login", "-u", "u", "-p", "Zq9SECRET", "https://api"],
            &["Zq9SECRET"],
            &["-p [REDACTED] https://api"],
        ),
        (
            &[
                "az",
                "keyvault",
                "secret",
                "set",
                "--vault-name",
                "v",
                "--name",
                "n",
                "--value",
                "Zq9SECRET",
            ],
            &["Zq9SECRET"],
            &["--name n --value "],
        ),
        (
            &[
                "aws",
                "ssm",
                "put-parameter",
                "--name",
                "/x",
                "--value=Zq9SECRET",
            ],
            &["Zq9SECRET"],
            &["--name /x --value="],
        ),
    ];

    #[test]
    fn ci_steps_keep_no_secret_and_most_of_their_text() {
        assert_args_redacted(CI_STEPS);
        // The rest of a script after a quoted scheme and a variable.
        let out = redact_args(&[
            "bash",
            "-e",
            "-c",
            "curl -H 'Authorization: Bearer '\"$TOKEN\" https://api/x -o out.json && ./deploy.sh prod",
        ]);
        assert!(
            out.contains("https://api/x -o out.json && ./deploy.sh prod"),
            "{out}"
        );
        for args in [
            &[
                "docker",
                "login",
                "--username",
                "AWS",
                "--password-stdin",
                "123456789012.dkr.ecr.us-east-1.amazonaws.com",
            ][..],
            &[
                "docker",
                "buildx",
                "build",
                "--secret",
                "id=npmrc,src=.npmrc",
                ".",
            ][..],
            &["cargo", "test", "--", "token::tests"][..],
            &[
                "aws",
                "secretsmanager",
                "get-secret-value",
                "--secret-id",
                "prod/openai",
            ][..],
        ] {
            assert_eq!(redact_args(args), args.join(" "));
        }
        // (A review of the fixes:) a value that starts with `{` is a
        // value; a quote after a heredoc's apostrophe opens the value; a
        // name and `::` before a value; a git URL's token.
        for (args, secret) in [
            (
                &["mysql", "--password", "{Zq9SECRET!x", "db"][..],
                "Zq9SECRET",
            ),
            (
                &[
                    "gh",
                    "secret",
                    "set",
                    "CFG",
                    "--body",
                    "{\"url\":\"Zq9SECRET\"}",
                ][..],
                "Zq9SECRET",
            ),
            (
                &[
                    "bash",
                    "-c",
                    "cat > n <<EOF\nthe runners' disks\nEOF\nsshpass -p 'Zq9 SECRET' ssh host",
                ][..],
                "SECRET",
            ),
            (
                &["tool", "--config", "api_token::Zq9SECRETvalue"][..],
                "Zq9SECRETvalue",
            ),
            (
                &["echo", "::set-output name=api_token::zq9secretvalue"][..],
                "zq9secretvalue",
            ),
        ] {
            let out = redact_args(args);
            assert!(!out.contains(secret), "`{secret}` survived in `{out}`");
        }
        let out = redact_args(&[
            "git",
            "clone",
            "https://x-access-token:Zq9SECRET@github.com/o/r.git",
            "dir",
        ]);
        assert_eq!(
            out,
            "git clone https://x-access-token:[REDACTED]@github.com/o/r.git dir"
        );
        // Prose in a script's quotes loses a word, not the rest.
        let out = redact_args(&[
            "bash",
            "-c",
            "git commit -m \"Password: minimum length is now 12\" && git push",
        ]);
        assert!(out.contains("length is now 12\" && git push"), "{out}");
        // Every URL in a word, however many come first.
        let many = format!(
            "{}postgres://ci:Zq9SECRET@db",
            "https://a.example/x,".repeat(300)
        );
        assert!(!redact_args(&["curl", "-d", &many]).contains("Zq9SECRET"));
        // (A last review:) pairs, webhooks, more tools, Redis, Vault and
        // Sonar tokens, `pw`.
        for (args, secret) in [
            (
                &[
                    "kubectl",
                    "patch",
                    "deployment",
                    "app",
                    "-p",
                    "{\"env\":[{\"name\":\"OPENAI_API_KEY\",\"value\":\"Zq9SECRET\"}]}",
                ][..],
                "Zq9SECRET",
            ),
            (
                &[
                    "curl",
                    "-d",
                    "{\"name\": \"DB_PASSWORD\", \"value\": \"Zq9SECRET\"}",
                ][..],
                "Zq9SECRET",
            ),
            (
                &[
                    "curl",
                    "-X",
                    "POST",
                    "https://hooks.slack.com/services/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",
                ][..],
                "pZ4kR9vXq2LmT7bN8cYwH3dF",
            ),
            (
                &[
                    "mongosh",
                    "mongodb://db:27017",
                    "-u",
                    "root",
                    "-p",
                    "Zq9SECRET",
                ][..],
                "Zq9SECRET",
            ),
            (
                &["poetry", "publish", "-u", "u", "-p", "Zq9SECRET"][..],
                "Zq9SECRET",
            ),
            (
                &["dotnet", "nuget", "push", "a.nupkg", "-k", "zq9secretkey"][..],
                "zq9secretkey",
            ),
            (
                &["http", "-a", "user:Zq9SECRET", "example.com"][..],
                "Zq9SECRET",
            ),
            (
                &["redis-server", "--requirepass", "Zq9SECRET"][..],
                "Zq9SECRET",
            ),
            (
                &["vault", "login", "hvs.CAESIGk3bXq9zTq8rP7mN2vL5cK1"][..],
                "CAESIGk3bXq9zTq8rP7mN2vL5cK1",
            ),
            (
                &[
                    "mvn",
                    "sonar:sonar",
                    "-Dsonar.token=squ_3f9a0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b",
                ][..],
                "3f9a0c1d2e3f",
            ),
            (
                &["terraform", "apply", "-var", "admin_pw=Zq9SECRET"][..],
                "Zq9SECRET",
            ),
        ] {
            let out = redact_args(args);
            assert!(!out.contains(secret), "`{secret}` survived in `{out}`");
        }
        // A URL's ordinary path stays.
        for args in [
            &[
                "curl",
                "https://api.github.com/repos/acme/widgets/releases/latest",
            ][..],
            &[
                "curl",
                "https://registry.npmjs.org/@types/node/-/node-22.10.1.tgz",
            ][..],
            &["poetry", "install", "-p", "3.11"][..],
        ] {
            assert_eq!(redact_args(args), args.join(" "));
        }
        // An apostrophe in prose opens no quote.
        let line = "slack-notify --message Build didn't pass --token=abc --channel '#ci'";
        let once = redact_cmdline(line);
        assert!(
            once.contains("--channel '#ci'") && !once.contains("abc"),
            "{once}"
        );
        assert_eq!(redact_cmdline(&once), once);
    }

    /// Lines where the first pass's quotes and the second's had differed
    /// (found by the property test below): a value that took its closing
    /// quote with it, an escaped quote that lost its backslash.
    #[test]
    fn a_second_pass_changes_nothing() {
        for line in [
            "api_key 'don't \" Cookie: \"",
            "\"me:a Bearer \\\" --password \"",
            "'don't curl api_key='a,b' a=b; -uci:pw",
        ] {
            let once = redact_cmdline(line);
            assert_eq!(redact_cmdline(&once), once, "from `{line}`");
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

    proptest::proptest! {
        /// Any line of these words (tools, flags, names, separators,
        /// secrets, URLs) redacts without a panic, and a second pass
        /// changes nothing.
        #[test]
        fn any_mix_is_redacted_once_and_for_all(
            words in proptest::collection::vec(proptest::sample::select(vec![
                "docker", "login", "sshpass", "mysql", "redis-cli", "curl", "gh", "secret",
                "twine", "ssh", "-p", "-pX9y", "-a", "-b", "-u", "-uci:pw", "-x", "--body",
                "--user=ci:pw", "--password", "--password=a;b)c", "--token-limit", "--api-key",
                "api_key", "OpenAI(api_key", "=", ":", "\"", "Bearer", "Authorization:",
                "Cookie:", "a=b;", "https://u:p/w@h/x", "https://h2xkqv7aalongpersonaltoken4z@h",
                "postgres://u:1/2@db", "u:pw@proxy", "sk-Zq9SECRETzq9abcdefgh", "[REDACTED]",
                "Xq7bT2mN9vLc4RzW8kPd3HsY6fJg", "value", "4096", "é", "",
                "'don't", "do'", "'X-Api-Key:", "\"me:a", "-p'a", "PASSWORD", "IDENTIFIED", "BY", "'a", "b'", "\"x,y\"", "api_key='a,b'", "\\\"", "a\\\"b",
            ]), 0..12)
        ) {
            let line = words.join(" ");
            let once = redact_cmdline(&line);
            proptest::prop_assert_eq!(redact_cmdline(&once), once.clone(), "from `{}`", line);
            // The same words as arguments, some holding two or three.
            let args: Vec<String> = words.chunks(1 + words.len() % 3).map(|c| c.join(" ")).collect();
            let _ = redact_args(&args);
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
            let _ = redact_args(&[s, s, "--token", s, "Authorization:", s]);
        }
        assert_eq!(redact_cmdline("--token \"\" x"), "--token \"\" x");
        // A value holding the marker is still read by the other rules.
        let out = redact_cmdline("--token [REDACTED]https://u:Zq9SECRETzq9@h x");
        assert!(!out.contains("Zq9SECRETzq9"), "{out}");
        assert_eq!(redact_cmdline(&out), out);
    }
}
