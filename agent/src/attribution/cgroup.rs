//! cgroup path and container id of a process, from the text of
//! `/proc/PID/cgroup` and `/proc/PID/cpuset`. Pure parsing: the reads are
//! in `procfs`.

/// Prefixes of a cgroup directory named after a container (systemd and
/// cgroupfs drivers of Docker, containerd's CRI, CRI-O, Podman), followed
/// by the container id and, with systemd, `.scope`.
const RUNTIME_PREFIXES: &[&str] = &["docker-", "cri-containerd-", "crio-", "libpod-"];
/// Shortest id accepted after a runtime prefix (Docker's short form).
const SHORT_ID: usize = 12;
/// A full container id.
const FULL_ID: usize = 64;

/// The cgroup v2 path (the `0::` line), e.g. `/system.slice/runner.service`.
pub(super) fn unified_path(cgroup_file: &str) -> Option<String> {
    cgroup_file
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
}

/// The container id named by the cgroup file: from the v2 path first, then
/// from the v1 hierarchies (hybrid hosts keep containers there).
pub(super) fn container_in_cgroup_file(cgroup_file: &str) -> Option<String> {
    let paths = cgroup_file
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2).map(|p| (l.starts_with("0::"), p)));
    let (v2, v1): (Vec<_>, Vec<_>) = paths.partition(|(unified, _)| *unified);
    v2.into_iter()
        .chain(v1)
        .find_map(|(_, p)| container_id(p.trim()))
}

/// The container id in a cgroup path, innermost first:
/// `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>`,
/// `libpod-<id>.scope` (an id of 12 to 64 hex digits), or a path segment
/// (or `:`-separated part of one) that is a 64-hex id, as in
/// `/docker/<id>`, `/actions_job/<id>`, `/kubepods/.../pod<uid>/<id>` and
/// `...slice:cri-containerd:<id>`.
pub(super) fn container_id(path: &str) -> Option<String> {
    path.rsplit('/')
        .flat_map(|seg| seg.rsplit(':'))
        .find_map(|part| {
            let part = part.strip_suffix(".scope").unwrap_or(part);
            let prefixed = RUNTIME_PREFIXES
                .iter()
                .find_map(|p| part.strip_prefix(p))
                .filter(|id| is_hex(id) && (SHORT_ID..=FULL_ID).contains(&id.len()));
            prefixed
                .or_else(|| (part.len() == FULL_ID && is_hex(part)).then_some(part))
                .map(str::to_ascii_lowercase)
        })
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e2c1b0a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f";

    #[test]
    fn container_id_forms() {
        let cases = [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!("/actions_job/{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods/besteffort/pod0a1b2c3d-0000-1111-2222-333344445555/{ID}"),
            format!("/kubepods.slice/kubepods-pod1.slice/crio-{ID}.scope"),
            format!("/kubepods/pod1/crio-{ID}"),
            format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            ),
            format!(
                "/system.slice/containerd.service/kubepods-burstable-pod1.slice:cri-containerd:{ID}"
            ),
        ];
        for c in &cases {
            assert_eq!(container_id(c).as_deref(), Some(ID), "{c}");
        }
        assert_eq!(
            container_id("/system.slice/docker-0123456789AB.scope").as_deref(),
            Some("0123456789ab"),
            "a 12-digit id after a runtime prefix"
        );
        for none in [
            "/",
            "/system.slice/actions.runner.acme.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/system.slice/docker-0123456789a.scope",
            "/system.slice/crio-conmon-0123456789ab.scope",
            "/lxc/deadbeefcafe",
            &format!("/docker/{}", &ID[..63]),
            &format!("/docker/{}x", &ID[..63]),
        ] {
            assert_eq!(container_id(none), None, "{none}");
        }
    }

    #[test]
    fn the_innermost_container_wins() {
        let outer = "a".repeat(64);
        let p = format!("/docker/{outer}/docker/{ID}");
        assert_eq!(container_id(&p).as_deref(), Some(ID));
    }

    #[test]
    fn cgroup_file_lines() {
        let hybrid = format!(
            "12:memory:/docker/{ID}\n11:cpuset:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/system.slice/containerd.service\n"
        );
        assert_eq!(
            unified_path(&hybrid).as_deref(),
            Some("/system.slice/containerd.service")
        );
        assert_eq!(container_in_cgroup_file(&hybrid).as_deref(), Some(ID));
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(container_in_cgroup_file(&v2).as_deref(), Some(ID));
        assert_eq!(unified_path("12:memory:/x\n"), None);
        assert_eq!(unified_path("0::\n"), None);
        assert_eq!(container_in_cgroup_file("0::/\n"), None);
        assert_eq!(container_in_cgroup_file("garbage"), None);
    }
}
