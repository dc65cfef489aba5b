//! Teams: a config table mapping repository patterns to team names.
//!
//! A pattern is matched against the whole repository (`owner/name`, or a
//! GitLab `group/sub/project`), ignoring ASCII case: `*` matches any run of
//! characters without `/`, `**` matches anything (including `/`), and as
//! a whole segment no segment too (`acme/**/ml-*` matches `acme/ml-eval`,
//! `**/ml-*` matches `ml-eval`, as in gitignore); every other character
//! matches itself.

use serde::Deserialize;

/// One `[[teams]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamRule {
    /// Team name recorded in `team`.
    pub name: String,
    /// Repository patterns (`acme/widgets`, `acme/*`, `acme/**`); the first
    /// rule with a matching pattern wins.
    pub repositories: Vec<String>,
}

impl TeamRule {
    /// Whether one of the rule's patterns matches `repository`.
    pub fn matches(&self, repository: &str) -> bool {
        self.repositories.iter().any(|p| glob_match(p, repository))
    }
}

/// The team of the first rule matching `repository`.
pub fn team_for<'a>(rules: &'a [TeamRule], repository: &str) -> Option<&'a str> {
    rules
        .iter()
        .find(|r| r.matches(repository))
        .map(|r| r.name.as_str())
}

/// Pure validation; the error names the key.
pub fn validate(rules: &[TeamRule]) -> Result<(), (String, String)> {
    for (i, r) in rules.iter().enumerate() {
        if r.name.trim().is_empty() {
            return Err((format!("teams[{i}].name"), "must not be empty".into()));
        }
        if r.repositories.is_empty() {
            return Err((
                format!("teams[{i}].repositories"),
                "needs at least one pattern".into(),
            ));
        }
        for (j, p) in r.repositories.iter().enumerate() {
            let key = || format!("teams[{i}].repositories[{j}]");
            if p.trim().is_empty() {
                return Err((key(), "must not be empty".into()));
            }
            if p.contains("***") {
                return Err((
                    key(),
                    format!("`{p}`: use `*` (within a path segment) or `**` (across segments)"),
                ));
            }
            if p.chars().any(char::is_whitespace) {
                return Err((
                    key(),
                    format!("`{p}` contains whitespace; a repository name has none"),
                ));
            }
        }
    }
    Ok(())
}

/// One element of a pattern.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok {
    Byte(u8),
    /// `*`: any bytes but `/`.
    Star,
    /// `**`: any bytes.
    Globstar,
    /// `**/` at the start, `/**/` inside: any run of whole segments, none
    /// too (nothing at the start, one `/` inside).
    Segments,
}

/// `pattern` against all of `text`, ASCII case-insensitively. Works on
/// bytes: `/` never occurs inside a multi-byte UTF-8 character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let mut toks = Vec::with_capacity(pattern.len());
    let pb = pattern.as_bytes();
    let mut i = 0;
    while i < pb.len() {
        let at_start = i == 0 && pb.starts_with(b"**/");
        if at_start || pb[i..].starts_with(b"/**/") {
            // `**/x` matches `x`; `a/**/x` matches `a/x`: what is left to
            // match starts after a `/` (or at the start), as it would with
            // no segment between.
            if !at_start {
                toks.push(Tok::Byte(b'/'));
            }
            toks.push(Tok::Segments);
            i += if at_start { 3 } else { 4 };
            continue;
        }
        if pb[i] == b'*' {
            if pb.get(i + 1) == Some(&b'*') {
                toks.push(Tok::Globstar);
                i += 2;
            } else {
                toks.push(Tok::Star);
                i += 1;
            }
        } else {
            toks.push(Tok::Byte(pb[i].to_ascii_lowercase()));
            i += 1;
        }
    }
    let t: Vec<u8> = text.bytes().map(|b| b.to_ascii_lowercase()).collect();
    // m[j]: the tokens so far match t[..j].
    let mut m = vec![false; t.len() + 1];
    m[0] = true;
    for tok in toks {
        let mut next = vec![false; t.len() + 1];
        match tok {
            Tok::Byte(b) => {
                for j in 0..t.len() {
                    next[j + 1] = m[j] && t[j] == b;
                }
            }
            Tok::Segments => {
                // Nothing, or any run that ends with `/`.
                let mut started = false;
                for j in 0..=t.len() {
                    next[j] = m[j] || (started && j > 0 && t[j - 1] == b'/');
                    started |= m[j];
                }
            }
            Tok::Star | Tok::Globstar => {
                next[0] = m[0];
                for j in 0..t.len() {
                    let extend = next[j] && (tok == Tok::Globstar || t[j] != b'/');
                    next[j + 1] = m[j + 1] || extend;
                }
            }
        }
        m = next;
    }
    m[t.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, pats: &[&str]) -> TeamRule {
        TeamRule {
            name: name.into(),
            repositories: pats.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn globs() {
        let yes = [
            ("acme/widgets", "acme/widgets"),
            ("acme/widgets", "ACME/Widgets"),
            ("acme/*", "acme/widgets"),
            ("acme/*", "acme/"),
            ("acme/web-*", "acme/web-app"),
            ("*/infra", "acme/infra"),
            ("acme/**", "acme/sub/group/proj"),
            ("**", "anything/at/all"),
            ("**/docs", "a/b/docs"),
            // A whole-segment `**` matches no segment too.
            ("**/docs", "docs"),
            ("acme/**/ml-*", "acme/ml-eval"),
            ("acme/**/ml-*", "acme/sub/ml-eval"),
            ("acme/**/x", "acme/a/b/x"),
            ("ACME/**/X", "acme/x"),
            ("a*b*c", "axxbyyc"),
            ("grüppe/*", "grüppe/x"),
        ];
        for (p, t) in yes {
            assert!(glob_match(p, t), "{p} should match {t}");
        }
        let no = [
            ("acme/widgets", "acme/widgets2"),
            ("acme/*", "acme/sub/proj"),
            ("acme/*", "other/widgets"),
            ("acme/**", "acme"),
            ("*/infra", "a/b/infra"),
            ("acme/web-*", "acme/api"),
            ("acme/**/ml-*", "acme/sub/other"),
            ("acme/**/x", "acmex"),
            ("acme/**/x", "acme/bx"),
            ("acme/**/x", "acme//x/y"),
            ("**/docs", "mydocs"),
            ("", "x"),
        ];
        for (p, t) in no {
            assert!(!glob_match(p, t), "{p} should not match {t}");
        }
        assert!(glob_match("", ""));
    }

    #[test]
    fn first_matching_rule_wins() {
        let rules = [
            rule("platform", &["acme/infra", "acme/infra-*"]),
            rule("web", &["acme/web*", "acme/**"]),
            rule("never", &["acme/web"]),
        ];
        assert_eq!(team_for(&rules, "acme/infra-tf"), Some("platform"));
        assert_eq!(team_for(&rules, "acme/web"), Some("web"));
        assert_eq!(team_for(&rules, "acme/x/y"), Some("web"));
        assert_eq!(team_for(&rules, "other/x"), None);
        assert_eq!(team_for(&[], "acme/x"), None);
    }

    #[test]
    fn validation_names_the_key() {
        assert!(validate(&[rule("a", &["acme/*"])]).is_ok());
        let e = validate(&[rule("a", &["x"]), rule(" ", &["x"])]).unwrap_err();
        assert_eq!(e.0, "teams[1].name");
        let e = validate(&[rule("a", &[])]).unwrap_err();
        assert_eq!(e.0, "teams[0].repositories");
        let e = validate(&[rule("a", &["x", ""])]).unwrap_err();
        assert_eq!(e.0, "teams[0].repositories[1]");
        let e = validate(&[rule("a", &["acme/***"])]).unwrap_err();
        assert_eq!(e.0, "teams[0].repositories[0]");
        let e = validate(&[rule("a", &["acme/ x"])]).unwrap_err();
        assert_eq!(e.0, "teams[0].repositories[0]");
    }
}
