//! Loading the embedded eBPF object, filling `CONFIG`, and attaching every
//! program to the cgroup through bpf_link (so a dead agent fails open).

use std::{fs::File, net::Ipv4Addr, path::Path};

use agent_common::{Config, config_flags};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr, cgroup_sock_addr::CgroupSockAddrLinkId},
};

use super::InterceptError;

/// The object aya-build leaves in `OUT_DIR` (empty with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// Attach order: getpeername and the UDP refusals first, so no redirected
/// socket exists before its peer name can be restored; connect4/6 last.
/// All are cgroup_sock_addr programs.
const PROGRAMS: [&str; 6] = [
    "tollgate_getpeername4",
    "tollgate_getpeername6",
    "tollgate_sendmsg4",
    "tollgate_sendmsg6",
    "tollgate_connect4",
    "tollgate_connect6",
];

/// What the kernel programs are told, in `CONFIG[0]`.
pub(crate) fn config(
    listen_v4: Ipv4Addr,
    listen_port: u16,
    agent_tgid: u32,
    netns_cookie: u64,
) -> Config {
    Config {
        netns_cookie,
        listen_addr6: std::net::Ipv6Addr::LOCALHOST.octets(),
        listen_addr4: listen_v4.octets(),
        agent_tgid,
        listen_port,
        _pad: 0,
        flags: config_flags::ENABLED,
    }
}

/// Loads the object (creating its maps) without loading any program.
pub(crate) fn load_object() -> Result<Ebpf, InterceptError> {
    if OBJECT.is_empty() {
        return Err(InterceptError::NoObject);
    }
    raise_memlock();
    EbpfLoader::new()
        .load(OBJECT)
        .map_err(|e| InterceptError::bpf("loading the eBPF object (creating its maps)", &e))
}

/// Writes `CONFIG[0]`; must happen before any program is attached.
pub(crate) fn write_config(ebpf: &mut Ebpf, config: &Config) -> Result<(), InterceptError> {
    let map = ebpf
        .map_mut("CONFIG")
        .ok_or_else(|| missing("map CONFIG"))?;
    let mut array: Array<&mut MapData, Config> =
        Array::try_from(map).map_err(|e| InterceptError::bpf("opening map CONFIG", &e))?;
    array
        .set(0, config, 0)
        .map_err(|e| InterceptError::bpf("writing map CONFIG", &e))
}

/// The links of one attachment, to detach them again.
pub(crate) type Links = Vec<(&'static str, CgroupSockAddrLinkId)>;

/// Loads every program into the kernel (which verifies it), attaching
/// nothing yet.
pub(crate) fn load_all(ebpf: &mut Ebpf) -> Result<(), InterceptError> {
    for name in PROGRAMS {
        program(ebpf, name)?
            .load()
            .map_err(|e| InterceptError::bpf(format!("loading program {name}"), &e))?;
    }
    Ok(())
}

/// Attaches every (loaded) program to `cgroup`: at start, and again when
/// the cgroup was removed and created anew. Returns the links and the id
/// of the cgroup they are on (read from the directory opened to attach,
/// so it is that cgroup's even if the path changes meanwhile).
pub(crate) fn attach_loaded(
    ebpf: &mut Ebpf,
    cgroup: &Path,
) -> Result<(Links, u64), InterceptError> {
    use std::os::unix::fs::MetadataExt as _;
    let io = |what, source| InterceptError::Io {
        what,
        path: cgroup.to_path_buf(),
        source,
    };
    let dir = File::open(cgroup).map_err(|e| io("cannot open the cgroup directory", e))?;
    let id = dir
        .metadata()
        .map_err(|e| io("cannot inspect the cgroup directory", e))?
        .ino();
    let mut links = Links::new();
    for name in PROGRAMS {
        // Links are always "multi" in the kernel: CgroupAttachMode::Single
        // (flags 0) is what bpf_link_create accepts, and it does not stop
        // other agents from attaching to this or other cgroups.
        let attached = program(ebpf, name)?
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| {
                InterceptError::bpf(
                    format!("attaching program {name} to {}", cgroup.display()),
                    &e,
                )
            });
        match attached {
            Ok(id) => links.push((name, id)),
            Err(e) => {
                // All or nothing: a half-attached set would redirect
                // without restoring peer names.
                detach(ebpf, links);
                return Err(e);
            }
        }
        tracing::debug!(program = name, cgroup = %cgroup.display(), "attached");
    }
    Ok((links, id))
}

/// Detaches `links` (those of a cgroup that is gone: the kernel dropped
/// the programs with it, and this frees the links).
pub(crate) fn detach(ebpf: &mut Ebpf, links: Links) {
    for (name, id) in links {
        if let Ok(p) = program(ebpf, name)
            && let Err(e) = p.detach(id)
        {
            tracing::debug!(program = name, error = %e, "detaching an old link");
        }
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSockAddr, InterceptError> {
    ebpf.program_mut(name)
        .ok_or_else(|| missing(&format!("program {name}")))?
        .try_into()
        .map_err(|e| InterceptError::bpf(format!("loading program {name}"), &e))
}

/// Loads the object and every program into the kernel, which verifies
/// them, and attaches nothing: dropping the object unloads them again.
/// Returns how many programs loaded.
pub(crate) fn verify_all() -> Result<usize, InterceptError> {
    let mut ebpf = load_object()?;
    load_all(&mut ebpf)?;
    Ok(PROGRAMS.len())
}

fn missing(what: &str) -> InterceptError {
    InterceptError::Bpf {
        action: format!("finding {what} in the embedded eBPF object"),
        detail: "not present (agent and agent-ebpf are out of step)".to_owned(),
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use
/// memcg accounting and ignore it. Raising it is harmless either way.
fn raise_memlock() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!(error = %e, "could not raise RLIMIT_MEMLOCK (fine on Linux >= 5.11)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout() {
        let c = config(Ipv4Addr::LOCALHOST, 15443, 42, 7);
        assert_eq!(c.listen_addr4, [127, 0, 0, 1], "network order");
        assert_eq!(c.listen_addr6[15], 1);
        assert!(c.listen_addr6[..15].iter().all(|b| *b == 0));
        assert_eq!(c.listen_port, 15443, "host order");
        assert_eq!((c.agent_tgid, c.netns_cookie), (42, 7));
        assert_eq!(c.flags & config_flags::ENABLED, config_flags::ENABLED);
    }

    #[test]
    #[cfg_attr(
        aya_build_skip,
        ignore = "built with AYA_BUILD_SKIP: no object to inspect"
    )]
    fn every_program_is_in_the_object() {
        assert!(!OBJECT.is_empty(), "the object is embedded");
        // Symbol names appear verbatim in the ELF string table.
        for name in PROGRAMS {
            assert!(
                OBJECT.windows(name.len()).any(|w| w == name.as_bytes()),
                "program {name} missing from the object"
            );
        }
    }
}
