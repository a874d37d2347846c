//! The caller check: does the process behind a FUSE request belong to the
//! container this mount serves?
//!
//! FUSE tells us the caller's pid (as seen in our pid namespace). We read
//! `/proc/PID/cgroup` and look for the container's cgroup where the runtimes
//! make it, as an anchored path, never "the id somewhere in the path":
//!
//! | runtime | the container's cgroup (v1 per controller, v2 the `0::` line) |
//! | --- | --- |
//! | runc, cgroupfs driver | `/<id>`, or `/<parent…>/<id>` under the parent its `cgroupsPath` names |
//! | Docker, cgroupfs | `/docker/<id>` |
//! | Kubernetes, cgroupfs driver | `/kubepods[/<qos>]/pod<uid>/<id>` |
//! | systemd driver (runc, Docker, podman, containerd, CRI-O) | `/<name>.slice/…/<prefix>-<id>.scope` |
//! | Kubernetes, systemd driver | `/kubepods.slice/[kubepods-<qos>.slice/]kubepods-[<qos>-]pod<uid>.slice/<prefix>-<id>.scope` |
//! | containerd, cgroupfs driver given a systemd-style path | `/system.slice/containerd.service/kubepods-…-pod<uid>.slice:cri-containerd:<id>` |
//!
//! A process may sit below its container's cgroup (a container running
//! systemd makes `…/<id>/system.slice/x.service`): whatever follows the
//! container's cgroup is the container's own. Above it, nothing may name
//! another container: the first container-like segment from the root
//! decides, so a container allowed to write its own cgroup tree cannot make
//! `/docker/<its id>/<our id>` and step into it.
//!
//! Delegated subtrees. An unprivileged user can create cgroups only where
//! it was handed a subtree (systemd's `user@UID.service`, or a userns
//! container's own cgroup): there it may make `…/<our id>` and move itself
//! in. So a container match is refused anywhere under `/user.slice`, and,
//! as the mechanism that catches every other place, when any directory
//! above the container's cgroup (looked up in the cgroup filesystem, per
//! hierarchy) is owned by a uid other than root or is writable by group or
//! others: whoever could create the container's cgroup there was not
//! necessarily the runtime. The container's own directory is not checked:
//! runtimes hand it to the container's user namespace, and creating it
//! needed write access to its parent, which is checked. A cgroup we cannot
//! look at (gone, or outside our cgroup namespace) is refused.
//! `--allow-cgroup` paths are the operator's explicit choice and skip this.
//!
//! Which lines decide: the unified (`0::`) line when it places the process
//! anywhere but the root (cgroup v2, and hybrid hosts where the runtime
//! joined the unified tree, as runc, containerd and Docker do); otherwise
//! every v1 line whose path is not `/`, each of which must pass. A process
//! whose every line is `/` is in no container and is refused.
//!
//! Pid reuse: the cgroup file is read through a directory handle on
//! `/proc/PID` opened first. The handle stays bound to that process: once it
//! exits, reads through the handle fail (ENOENT, ESRCH) even if a new process
//! gets its pid, and the answer is no.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use procfs::process::Process;
use procfs::ProcError;

/// How long a Docker-style short id must be to match as a prefix.
pub const MIN_ID_PREFIX: usize = 12;

/// systemd scope prefixes the runtimes use: `<prefix>-<id>.scope`.
const SCOPE_PREFIXES: &[&str] = &["docker", "cri-containerd", "crio", "libpod", "runc"];

/// Where the kernel's cgroup filesystems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroups systemd delegates to each logged-in user.
const USER_SLICE: &str = "user.slice";

/// Who may use the mount.
#[derive(Debug)]
pub struct CallerPolicy {
    container_ids: Vec<String>,
    allow_cgroups: Vec<String>,
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    hierarchies: Hierarchies,
    /// The only owner a cgroup directory above a container may have: root
    /// (tests build their fixture as whoever runs them).
    trusted_uid: u32,
    /// A cgroup line we cannot parse is logged once, not on every open.
    warned_format: AtomicBool,
}

/// A caller that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerInfo {
    pub pid: u32,
    /// The configured container id or `--allow-cgroup` path that matched.
    pub matched: String,
    /// The deciding cgroup path.
    pub cgroup: String,
}

/// A refused caller, with what we learned about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub pid: u32,
    pub reason: DenyReason,
    /// The deciding cgroup path, when it was read.
    pub cgroup: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// FUSE reports pid 0 for a caller outside our pid namespace.
    OutsidePidNamespace,
    /// `/proc/PID` is gone or unreadable.
    ProcUnreadable(String),
    /// The process exited, or its pid was reused, while we looked.
    ProcessChanged,
    /// A line of `/proc/PID/cgroup` is not in the kernel's format.
    UnexpectedFormat(String),
    /// The process is in no container's cgroup.
    NotInAContainer,
    /// The process is in a cgroup no rule allows.
    NotAllowed,
    /// The container's cgroup lies in a subtree an unprivileged user can
    /// write (see the module comment): anyone there could have named it.
    DelegatedCgroup(String),
    /// The cgroup directories could not be checked for their owner.
    CgroupUnverifiable(String),
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DenyReason::OutsidePidNamespace => {
                f.write_str("caller is outside the mount's pid namespace (pid 0)")
            }
            DenyReason::ProcUnreadable(e) => write!(f, "cannot read the caller's /proc entry: {e}"),
            DenyReason::ProcessChanged => {
                f.write_str("the caller exited or its pid was reused during the check")
            }
            DenyReason::UnexpectedFormat(line) => {
                write!(f, "unexpected line in the caller's cgroup file: {line:?}")
            }
            DenyReason::NotInAContainer => f.write_str("caller is in no container's cgroup"),
            DenyReason::NotAllowed => f.write_str("caller is not in the mount's container"),
            DenyReason::DelegatedCgroup(why) => write!(
                f,
                "caller's cgroup is named like the container but lies in a subtree an unprivileged user controls ({why})"
            ),
            DenyReason::CgroupUnverifiable(why) => {
                write!(f, "cannot check who owns the caller's cgroup: {why}")
            }
        }
    }
}

/// A `--container` or `--allow-cgroup` value that can never match safely.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("--container {0:?}: a container id is letters, digits, '.', '_', '+' and '-' (as runc, Docker and containerd write it)")]
    BadContainerId(String),
    #[error("--container {0:?}: a hex id prefix must have at least {MIN_ID_PREFIX} characters; give the full id")]
    ShortPrefix(String),
    #[error("--allow-cgroup {0:?}: give an absolute cgroup path such as /system.slice/app.service (no '.', '..' or empty segments, not '/')")]
    BadCgroupPath(String),
    #[error("the caller check needs at least one --container or --allow-cgroup")]
    Empty,
}

impl CallerPolicy {
    /// A policy over the real `/proc`.
    pub fn new(
        container_ids: Vec<String>,
        allow_cgroups: Vec<String>,
    ) -> Result<CallerPolicy, PolicyError> {
        Self::with_roots(container_ids, allow_cgroups, "/proc", CGROUP_ROOT)
    }

    /// As [`CallerPolicy::new`], reading `<proc_root>/PID/…` and the cgroup
    /// directories under `cgroup_root` (tests use fixture directories).
    pub fn with_roots(
        container_ids: Vec<String>,
        allow_cgroups: Vec<String>,
        proc_root: impl Into<PathBuf>,
        cgroup_root: impl Into<PathBuf>,
    ) -> Result<CallerPolicy, PolicyError> {
        if container_ids.is_empty() && allow_cgroups.is_empty() {
            return Err(PolicyError::Empty);
        }
        for id in &container_ids {
            let valid = !id.is_empty()
                && id.len() <= 1024
                && !id.starts_with('.')
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
            if !valid {
                return Err(PolicyError::BadContainerId(id.clone()));
            }
            // A short hex string is most likely a truncated Docker id meant
            // as a prefix; too short to be unambiguous.
            if is_hex(id) && id.len() < MIN_ID_PREFIX {
                return Err(PolicyError::ShortPrefix(id.clone()));
            }
        }
        let mut cgroups = Vec::with_capacity(allow_cgroups.len());
        for path in allow_cgroups {
            let trimmed = path.trim_end_matches('/');
            let valid = trimmed.starts_with('/')
                && trimmed[1..]
                    .split('/')
                    .all(|s| !s.is_empty() && s != "." && s != "..");
            if !valid {
                return Err(PolicyError::BadCgroupPath(path));
            }
            cgroups.push(trimmed.to_owned());
        }
        let cgroup_root = cgroup_root.into();
        Ok(CallerPolicy {
            container_ids,
            allow_cgroups: cgroups,
            proc_root: proc_root.into(),
            hierarchies: Hierarchies::find(&cgroup_root),
            cgroup_root,
            trusted_uid: 0,
            warned_format: AtomicBool::new(false),
        })
    }

    /// Checks the process `pid` (from the FUSE request).
    pub fn check(&self, pid: u32) -> Result<CallerInfo, Denial> {
        if pid == 0 {
            return Err(Denial {
                pid,
                reason: DenyReason::OutsidePidNamespace,
                cgroup: None,
            });
        }
        // Not found here: no such process (any more), or not in our pid
        // namespace's /proc.
        let dir = ProcDir::open(self.proc_root.join(pid.to_string())).map_err(|e| Denial {
            pid,
            reason: DenyReason::ProcUnreadable(e.to_string()),
            cgroup: None,
        })?;
        self.check_process(pid, &dir)
    }

    /// The check of the process `dir` holds.
    fn check_process(&self, pid: u32, dir: &ProcDir) -> Result<CallerInfo, Denial> {
        let deny = |reason, cgroup| Denial {
            pid,
            reason,
            cgroup,
        };
        let cgroup_text = dir
            .read("cgroup")
            .map_err(|e| deny(vanished_or_unreadable(e), None))?;
        let lines = match parse_cgroup_file(&cgroup_text) {
            Ok(lines) => lines,
            Err(line) => {
                if !self.warned_format.swap(true, Ordering::Relaxed) {
                    tracing::warn!(pid, line = %line, "unexpected format in /proc/PID/cgroup; refusing such callers (logged once)");
                }
                return Err(deny(DenyReason::UnexpectedFormat(line), None));
            }
        };
        let deciding = deciding_lines(&lines);
        let Some(first) = deciding.first() else {
            return Err(deny(DenyReason::NotInAContainer, Some("/".into())));
        };
        let mut matched = None;
        for line in &deciding {
            let denied = |reason| deny(reason, Some(line.path.to_owned()));
            match self.match_path(line.path) {
                Some(Match::Cgroup(rule)) => matched = matched.or(Some(rule)),
                Some(Match::Container { id, cgroup }) => {
                    self.check_not_delegated(line, cgroup).map_err(denied)?;
                    matched = matched.or(Some(id));
                }
                None => return Err(denied(DenyReason::NotAllowed)),
            }
        }
        Ok(CallerInfo {
            pid,
            matched: matched.expect("at least one deciding path matched"),
            cgroup: first.path.to_owned(),
        })
    }

    /// The rule (container id or allowed cgroup) that admits `path`.
    fn match_path<'p>(&self, path: &'p str) -> Option<Match<'p>> {
        if let Some((id, cgroup)) = container_of(path, &self.container_ids) {
            return Some(Match::Container { id, cgroup });
        }
        self.allow_cgroups
            .iter()
            .find(|allowed| {
                path.strip_prefix(allowed.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .cloned()
            .map(Match::Cgroup)
    }

    /// Refuses a container's cgroup (`cgroup`, a prefix of `line.path`)
    /// that an unprivileged user could have made (see the module comment).
    fn check_not_delegated(&self, line: &CgroupLine<'_>, cgroup: &str) -> Result<(), DenyReason> {
        let segments: Vec<&str> = cgroup.split('/').filter(|s| !s.is_empty()).collect();
        if segments.first() == Some(&USER_SLICE) {
            return Err(DenyReason::DelegatedCgroup(format!(
                "/{USER_SLICE} holds the users' own cgroups"
            )));
        }
        let dir = self.hierarchies.dir(line).ok_or_else(|| {
            DenyReason::CgroupUnverifiable(format!(
                "no cgroup filesystem for hierarchy {} ({:?}) under {}",
                line.hierarchy,
                line.controllers,
                self.cgroup_root.display()
            ))
        })?;
        // The root, then every ancestor down to the container's parent.
        for depth in 0..segments.len() {
            let ancestor = &segments[..depth];
            let shown = format!("/{}", ancestor.join("/"));
            let meta = std::fs::symlink_metadata(dir.join(ancestor.join("/")))
                .map_err(|e| DenyReason::CgroupUnverifiable(format!("{shown}: {e}")))?;
            if !meta.is_dir() {
                return Err(DenyReason::CgroupUnverifiable(format!(
                    "{shown} is not a cgroup directory"
                )));
            }
            if meta.uid() != self.trusted_uid {
                return Err(DenyReason::DelegatedCgroup(format!(
                    "{shown} is owned by uid {}",
                    meta.uid()
                )));
            }
            if meta.mode() & 0o022 != 0 {
                return Err(DenyReason::DelegatedCgroup(format!(
                    "{shown} is writable by group or others (mode {:o})",
                    meta.mode() & 0o7777
                )));
            }
        }
        Ok(())
    }

    /// Whether some running process passes the check now: `--container`
    /// with an id that matches nothing is allowed (the container may start
    /// later), but worth a warning at start.
    pub fn any_process_matches(&self) -> bool {
        let Ok(entries) = std::fs::read_dir(&self.proc_root) else {
            return false;
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .any(|pid| self.check(pid).is_ok())
    }
}

/// Where the cgroup hierarchies are mounted under the cgroup root, found
/// once at start (the host's layout is set at boot): the unified one at
/// the root on a cgroup v2 host and at `unified/` on a hybrid one; a v1
/// hierarchy under its controllers' names (`cpu,cpuacct`, `memory`, and the
/// `cpu` and `cpuacct` links to it) or its `name=` (`systemd`), as systemd
/// lays them out.
#[derive(Debug, Default)]
struct Hierarchies {
    unified: Option<PathBuf>,
    /// Every directory under the root that is a cgroup, by name.
    v1: HashMap<String, PathBuf>,
}

impl Hierarchies {
    fn find(root: &Path) -> Hierarchies {
        let is_cgroup = |dir: &Path| dir.join("cgroup.procs").is_file();
        // A cgroup may itself be called `unified`: go by the root's own
        // cgroup v2 file instead.
        let unified = if root.join("cgroup.controllers").is_file() {
            Some(root.to_path_buf())
        } else {
            Some(root.join("unified")).filter(|d| is_cgroup(d))
        };
        // Unreadable: no hierarchy is found, and every container match is
        // refused as unverifiable.
        let v1 = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let dir = entry.path();
                is_cgroup(&dir).then_some((entry.file_name().into_string().ok()?, dir))
            })
            .collect();
        Hierarchies { unified, v1 }
    }

    /// Where `line`'s hierarchy is mounted.
    fn dir(&self, line: &CgroupLine<'_>) -> Option<&Path> {
        if line.hierarchy == 0 {
            return self.unified.as_deref();
        }
        let names: Vec<&str> = line
            .controllers
            .split(',')
            .map(|c| c.strip_prefix("name=").unwrap_or(c))
            .collect();
        std::iter::once(names.join(","))
            .chain(names.iter().map(|n| (*n).to_owned()))
            .find_map(|n| self.v1.get(&n))
            .map(PathBuf::as_path)
    }
}

/// A read through a [`ProcDir`] failed: the process is gone (its pid may
/// be someone else's by now), or its entry could not be read.
fn vanished_or_unreadable(e: ProcError) -> DenyReason {
    match e {
        // procfs reports ESRCH (the handle outlived the process) as NotFound.
        ProcError::NotFound(_) => DenyReason::ProcessChanged,
        ProcError::Io(io, _)
            if io.raw_os_error() == Some(libc::ESRCH)
                || io.kind() == std::io::ErrorKind::NotFound =>
        {
            DenyReason::ProcessChanged
        }
        e => DenyReason::ProcUnreadable(e.to_string()),
    }
}

/// A handle on `/proc/PID` (procfs keeps an O_PATH directory descriptor):
/// files opened or read through it belong to that process even if the pid
/// is reused meanwhile (they then fail with ENOENT or ESRCH).
struct ProcDir {
    process: Process,
}

impl ProcDir {
    fn open(path: PathBuf) -> Result<ProcDir, ProcError> {
        Ok(ProcDir {
            process: Process::new_with_root(path)?,
        })
    }

    /// The file's text as is: the checks below, not procfs's lenient
    /// parsers, decide what a well-formed file is.
    fn read(&self, name: &str) -> Result<String, ProcError> {
        let mut file = self.process.open_relative(name)?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        Ok(text)
    }
}

/// One line of `/proc/PID/cgroup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CgroupLine<'a> {
    hierarchy: u32,
    /// Empty on the unified line.
    controllers: &'a str,
    path: &'a str,
}

/// Parses the whole file; Err(the first line not in the kernel's format).
/// v1: `ID:controller[,controller…]:/path` (or `ID:name=NAME:/path`);
/// v2: `0::/path`. The path may itself contain ':'.
fn parse_cgroup_file(text: &str) -> Result<Vec<CgroupLine<'_>>, String> {
    let mut lines = Vec::new();
    // Split where the kernel ends lines, at '\n' only: `str::lines` also
    // drops a '\r' before it, and a cgroup named `<id>\r` would read as
    // `<id>`.
    for line in text.split_terminator('\n') {
        let bad = || line.to_owned();
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let hierarchy: u32 = if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
            id.parse().map_err(|_| bad())?
        } else {
            return Err(bad());
        };
        let controllers_ok = if hierarchy == 0 {
            controllers.is_empty()
        } else {
            !controllers.is_empty()
                && controllers.split(',').all(|c| {
                    let name = c.strip_prefix("name=").unwrap_or(c);
                    !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
                })
        };
        if !controllers_ok || !path.starts_with('/') || path.contains('\0') {
            return Err(bad());
        }
        lines.push(CgroupLine {
            hierarchy,
            controllers,
            path,
        });
    }
    if lines.is_empty() {
        return Err(String::new());
    }
    Ok(lines)
}

/// The lines that decide (see the module comment).
fn deciding_lines<'a>(lines: &[CgroupLine<'a>]) -> Vec<CgroupLine<'a>> {
    if let Some(unified) = lines.iter().find(|l| l.hierarchy == 0 && l.path != "/") {
        return vec![*unified];
    }
    lines
        .iter()
        .filter(|l| l.hierarchy != 0 && l.path != "/")
        .copied()
        .collect()
}

/// What admitted a cgroup path.
#[derive(Debug, PartialEq, Eq)]
enum Match<'p> {
    /// A `--container` id. `cgroup` is the container's own cgroup: the
    /// prefix of the path that the runtime made.
    Container { id: String, cgroup: &'p str },
    /// An `--allow-cgroup` path.
    Cgroup(String),
}

/// How a segment names a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named<'s> {
    /// `<prefix>-<id>.scope`, made by a runtime's systemd driver.
    Scope,
    /// `<pod slice>:cri-containerd:<id>`: containerd's cgroupfs driver
    /// taking kubelet's systemd-style cgroupsPath literally.
    CriContainerd { pod_slice: &'s str },
    /// The bare id (runc's cgroupfs driver, Docker's `/docker/<id>`,
    /// Kubernetes' cgroupfs pods).
    Plain,
}

/// The configured id whose container `path` is in, and that container's
/// cgroup (a prefix of `path`): the first segment from the root that names
/// a container decides; it must be one of `ids` and sit where its runtime
/// puts it (see the module's table).
fn container_of<'p>(path: &'p str, ids: &[String]) -> Option<(String, &'p str)> {
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    // `..` is how a cgroup outside our cgroup namespace shows: nothing to
    // anchor to. (The kernel never writes empty or `.` segments.)
    if segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return None;
    }
    let mut end = 0;
    for (k, &segment) in segments.iter().enumerate() {
        end += 1 + segment.len();
        let (named, candidate) = match container_name(segment) {
            Some((named, id)) => (Some(named), id),
            None => (None, segment),
        };
        if let Some(id) = ids.iter().find(|id| id_matches(id, candidate)) {
            let parent = &segments[..k];
            return anchored(parent, named.unwrap_or(Named::Plain))
                .then(|| (id.clone(), &path[..end]));
        }
        // The first container-like segment that is not ours: whatever
        // follows is inside another container.
        if named.is_some() || is_full_id(segment) {
            return None;
        }
    }
    None
}

/// The id a segment names in one of the runtimes' decorated forms.
fn container_name(segment: &str) -> Option<(Named<'_>, &str)> {
    if let Some(id) = segment_container(segment) {
        return Some((Named::Scope, id));
    }
    let (pod_slice, id) = segment.split_once(":cri-containerd:")?;
    (!id.is_empty()).then_some((Named::CriContainerd { pod_slice }, id))
}

/// Whether a container named as `named` may sit under `parent` (the
/// segments above it): where its runtime would have made it.
fn anchored(parent: &[&str], named: Named<'_>) -> bool {
    match named {
        // runc puts `/<id>` under whatever parent its cgroupsPath names (on
        // cgroup v1, under its own cgroup per controller); nothing above it
        // names a container (checked by the caller), and the owners of the
        // directories above it are checked in the cgroup filesystem.
        Named::Plain => true,
        // systemd makes scopes in slices only; kubelet's pod slices sit in
        // `kubepods.slice` and end in `-pod<uid>.slice`.
        Named::Scope => {
            !parent.is_empty()
                && parent.iter().all(|s| s.ends_with(".slice"))
                && (parent[0] != "kubepods.slice" || parent.last().is_some_and(|s| is_pod_slice(s)))
        }
        Named::CriContainerd { pod_slice } => {
            is_pod_slice(pod_slice)
                && (parent.is_empty() || parent == ["system.slice", "containerd.service"])
        }
    }
}

/// `kubepods-[<qos>-]pod<uid>.slice`, the slice kubelet makes for a pod.
fn is_pod_slice(segment: &str) -> bool {
    segment
        .strip_prefix("kubepods-")
        .and_then(|s| s.strip_suffix(".slice"))
        .and_then(|s| s.rsplit('-').next())
        .is_some_and(|last| last.len() > 3 && last.starts_with("pod"))
}

/// The id inside a runtime's systemd scope name, `<prefix>-<id>.scope`.
/// The monitors' scopes (`libpod-conmon-<id>.scope`, `crio-conmon-…`) are
/// not the container and give nothing.
fn segment_container(segment: &str) -> Option<&str> {
    let inner = segment.strip_suffix(".scope")?;
    SCOPE_PREFIXES.iter().find_map(|prefix| {
        let id = inner.strip_prefix(prefix)?.strip_prefix('-')?;
        (!id.is_empty() && !id.starts_with("conmon-")).then_some(id)
    })
}

/// `configured` names the container `candidate`: equal, or an unambiguous
/// hex prefix of a full 64-hex id.
fn id_matches(configured: &str, candidate: &str) -> bool {
    configured == candidate
        || (is_full_id(candidate)
            && configured.len() >= MIN_ID_PREFIX
            && is_hex(configured)
            && candidate.starts_with(&configured.to_ascii_lowercase()))
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Docker, containerd and CRI-O ids: 64 lower-case hex digits.
fn is_full_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const ID: &str = "3f4e8a1b2c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
    const OTHER: &str = "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9";

    /// A fixture /proc with processes added by `add`, and a fixture cgroup
    /// filesystem (hybrid layout) holding their cgroups.
    struct FakeProc {
        dir: tempfile::TempDir,
        cg: tempfile::TempDir,
    }

    /// `mkdir -p` with mode 0755 whatever the umask: a group-writable
    /// fixture would look delegated.
    fn mkdirs(root: &Path, rel: &str) {
        use std::os::unix::fs::PermissionsExt;
        let mut dir = root.to_path_buf();
        for seg in rel.split('/').filter(|s| !s.is_empty()) {
            dir.push(seg);
            if !dir.exists() {
                std::fs::create_dir(&dir).unwrap();
            }
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    impl FakeProc {
        fn new() -> FakeProc {
            FakeProc {
                dir: tempfile::tempdir().unwrap(),
                cg: tempfile::tempdir().unwrap(),
            }
        }

        fn add(&self, pid: u32, cgroup: &str) -> &Self {
            let d = self.dir.path().join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cgroup"), cgroup).unwrap();
            for line in cgroup.lines() {
                let mut parts = line.splitn(3, ':');
                let (Some(h), Some(controllers), Some(path)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                if path.split('/').any(|s| s == "..") {
                    continue; // outside the fixture: unverifiable, as in life
                }
                let hierarchy = if h == "0" {
                    "unified".to_owned()
                } else {
                    controllers.replace("name=", "")
                };
                self.mkcgroup(&hierarchy, path);
            }
            self
        }

        /// Makes `path` in the fixture hierarchy `hierarchy`.
        fn mkcgroup(&self, hierarchy: &str, path: &str) -> PathBuf {
            mkdirs(self.cg.path(), hierarchy);
            let root = self.cg.path().join(hierarchy);
            std::fs::write(root.join("cgroup.procs"), "").unwrap();
            mkdirs(&root, path);
            root.join(path.trim_start_matches('/'))
        }

        fn policy(&self, ids: &[&str], cgroups: &[&str]) -> CallerPolicy {
            let mut policy = CallerPolicy::with_roots(
                ids.iter().map(|s| s.to_string()).collect(),
                cgroups.iter().map(|s| s.to_string()).collect(),
                self.dir.path(),
                self.cg.path(),
            )
            .unwrap();
            policy.trusted_uid = rustix::process::geteuid().as_raw();
            policy
        }
    }

    fn v2(path: &str) -> String {
        format!("0::{path}\n")
    }

    /// A hybrid host's file: every v1 controller and the unified line at `path`.
    fn v1_all(path: &str) -> String {
        format!(
            "12:pids:{path}\n11:cpu,cpuacct:{path}\n4:memory:{path}\n1:name=systemd:{path}\n0::{path}\n"
        )
    }

    /// Checks `cgroup` against a policy for `ids`.
    fn check(cgroup: &str, ids: &[&str]) -> Result<CallerInfo, Denial> {
        let p = FakeProc::new();
        p.add(100, cgroup);
        p.policy(ids, &[]).check(100)
    }

    fn admits(cgroup: &str, ids: &[&str]) -> bool {
        check(cgroup, ids).is_ok()
    }

    #[test]
    fn each_runtimes_cgroup_path_is_recognised_in_v2() {
        let paths = [
            format!("/{ID}"),                                          // runc default cgroupsPath
            format!("/mygroup/{ID}"),                                  // runc, cgroupsPath under a parent
            format!("/system.slice/runc-{ID}.scope"),                  // runc, systemd driver
            format!("/docker/{ID}"),                                   // Docker, cgroupfs
            format!("/system.slice/docker-{ID}.scope"),                // Docker, systemd
            format!("/system.slice/containerd.service/kubepods-burstable-pod1234.slice:cri-containerd:{ID}"),
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/cri-containerd-{ID}.scope"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/crio-{ID}.scope"),
            format!("/kubepods.slice/kubepods-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/cri-containerd-{ID}.scope"), // guaranteed QoS
            format!("/kubepods/burstable/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/{ID}"), // k8s cgroupfs
            format!("/kubepods/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/{ID}"), // k8s cgroupfs, guaranteed
            format!("/machine.slice/libpod-{ID}.scope/container"),     // podman, nested
            format!("/docker/{ID}/system.slice/nginx.service"),        // systemd inside
        ];
        for path in &paths {
            let info = check(&v2(path), &[ID]).unwrap_or_else(|d| panic!("{path}: {d:?}"));
            assert_eq!(info.matched, ID);
            assert_eq!(info.cgroup, *path);
            assert_eq!(info.pid, 100);
        }
    }

    #[test]
    fn container_scopes_are_anchored_where_the_runtimes_make_them() {
        // Review finding 2: the id anywhere in the path was enough. Each of
        // these names the container, but not where a runtime puts it.
        let misplaced = [
            format!("/docker-{ID}.scope"),         // a scope outside any slice
            format!("/srv/app/docker-{ID}.scope"), // a scope under plain directories
            format!("/system.slice/x.service/crio-{ID}.scope"),
            format!("/kubepods.slice/cri-containerd-{ID}.scope"), // not in a pod's slice
            format!("/kubepods.slice/kubepods-burstable.slice/cri-containerd-{ID}.scope"),
            format!("/srv/kubepods-burstable-pod1234.slice:cri-containerd:{ID}"),
            format!("/system.slice/containerd.service/evil.slice:cri-containerd:{ID}"),
            format!("/../../{ID}"), // outside our cgroup namespace: nothing to anchor to
        ];
        for path in &misplaced {
            assert_eq!(
                check(&v2(path), &[ID]).map_err(|d| d.reason),
                Err(DenyReason::NotAllowed),
                "{path}"
            );
        }
    }

    #[test]
    fn a_users_own_cgroups_are_refused_however_named() {
        // systemd delegates these to the user: it may create any name there.
        for path in [
            format!("/user.slice/user-1000.slice/user@1000.service/app.slice/{ID}"),
            format!("/user.slice/user-1000.slice/session-3.scope/{ID}"),
            format!("/user.slice/{ID}"),
        ] {
            let d = check(&v2(&path), &[ID]).unwrap_err();
            assert!(
                matches!(&d.reason, DenyReason::DelegatedCgroup(why) if why.contains("/user.slice")),
                "{path}: {d:?}"
            );
            assert_eq!(d.cgroup.as_deref(), Some(path.as_str()));
        }
        // A scope outside a slice is not where a runtime puts it anyway.
        assert!(!admits(
            &v2(&format!(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{ID}.scope"
            )),
            &[ID]
        ));
        // An operator may still allow such a cgroup by its path, knowingly.
        let p = FakeProc::new();
        p.add(
            7,
            &v2("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service"),
        );
        assert!(p
            .policy(
                &[ID],
                &["/user.slice/user-1000.slice/user@1000.service/app.slice"]
            )
            .check(7)
            .is_ok());
    }

    #[test]
    fn a_cgroup_below_a_directory_a_user_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        // The mechanism behind the user.slice rule: any directory above the
        // container's cgroup that is not root's alone was delegated.
        let p = FakeProc::new();
        p.add(1, &v2(&format!("/shared/{ID}")));
        let shared = p.cg.path().join("unified/shared");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o775)).unwrap();
        let d = p.policy(&[ID], &[]).check(1).unwrap_err();
        assert!(
            matches!(&d.reason, DenyReason::DelegatedCgroup(why) if why.contains("/shared") && why.contains("775")),
            "{d:?}"
        );
        assert!(d.reason.to_string().contains("unprivileged user"));

        // Owned by an unprivileged uid, as `chown -R` delegation leaves it.
        assert!(
            rustix::process::geteuid().is_root(),
            "this test chowns fixture cgroup directories: run it as root (as CI does)"
        );
        let p = FakeProc::new();
        p.add(2, &v2(&format!("/delegated/sub/{ID}")));
        p.add(3, &v2(&format!("/ok/{ID}")));
        let chown =
            |path: &Path, uid| std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
        chown(&p.cg.path().join("unified/delegated"), 1000);
        // The container's own directory handed to its user namespace's root.
        chown(&p.cg.path().join(format!("unified/ok/{ID}")), 100_000);
        let policy = p.policy(&[ID], &[]);
        let d = policy.check(2).unwrap_err();
        assert_eq!(
            d.reason,
            DenyReason::DelegatedCgroup("/delegated is owned by uid 1000".into())
        );
        assert!(
            policy.check(3).is_ok(),
            "the container's own cgroup may be delegated"
        );

        // In a v1 hierarchy (pure v1 host), the owner is checked there.
        let p = FakeProc::new();
        p.add(
            4,
            &format!("4:memory:/delegated/{ID}\n1:name=systemd:/{ID}\n"),
        );
        chown(&p.cg.path().join("memory/delegated"), 1000);
        assert!(matches!(
            p.policy(&[ID], &[]).check(4).unwrap_err().reason,
            DenyReason::DelegatedCgroup(_)
        ));
    }

    #[test]
    fn a_cgroup_that_cannot_be_looked_at_is_refused() {
        let p = FakeProc::new();
        p.add(1, &v2(&format!("/gone/{ID}")));
        std::fs::remove_dir_all(p.cg.path().join("unified/gone")).unwrap();
        let d = p.policy(&[ID], &[]).check(1).unwrap_err();
        assert!(
            matches!(d.reason, DenyReason::CgroupUnverifiable(_)),
            "{d:?}"
        );
        // No cgroup filesystem at all.
        let p = FakeProc::new();
        p.add(2, &v2(&format!("/{ID}")));
        std::fs::remove_dir_all(p.cg.path().join("unified")).unwrap();
        let d = p.policy(&[ID], &[]).check(2).unwrap_err();
        assert!(
            matches!(d.reason, DenyReason::CgroupUnverifiable(_)),
            "{d:?}"
        );
    }

    #[test]
    fn a_pure_v2_host_has_the_unified_hierarchy_at_the_root() {
        // The fixture makes both in `unified/`; only `/x` is also at the root.
        let p = FakeProc::new();
        p.add(1, &v2(&format!("/y/{ID}")));
        p.add(2, &v2(&format!("/x/{ID}")));
        // A cgroup v2 root, with a cgroup that happens to be called `unified`.
        std::fs::write(p.cg.path().join("cgroup.controllers"), "").unwrap();
        p.mkcgroup("", &format!("/x/{ID}"));
        let policy = p.policy(&[ID], &[]);
        assert!(
            matches!(
                policy.check(1).unwrap_err().reason,
                DenyReason::CgroupUnverifiable(_)
            ),
            "/y is not in the v2 root"
        );
        assert!(policy.check(2).is_ok());
    }

    #[test]
    fn cgroup_v1_and_hybrid_files_are_recognised() {
        // Pure v1 (no unified line): every controller places it in the container.
        let v1 =
            format!("12:pids:/docker/{ID}\n4:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n");
        assert!(admits(&v1, &[ID]));
        // Hybrid: all lines.
        assert!(admits(&v1_all(&format!("/docker/{ID}")), &[ID]));
        // What runc wrote on this project's CI host: memory nested under
        // the host's own cgroup (a 32-hex segment), the rest at /<id>.
        let ci = format!(
            "9:name=systemd:/{ID}\n4:memory:/process_api/1498266bca3f50b0a6d3d74760d66e98/{ID}\n1:cpu:/{ID}\n0::/{ID}\n"
        );
        assert!(admits(&ci, &[ID]));
        // Hybrid with the unified line at the root: the v1 lines decide,
        // and all of them must agree.
        let split = format!("4:memory:/docker/{ID}\n1:name=systemd:/docker/{OTHER}\n0::/\n");
        assert_eq!(
            check(&split, &[ID]).unwrap_err().reason,
            DenyReason::NotAllowed
        );
        let ok = format!("4:memory:/docker/{ID}\n3:rdma:/\n1:name=systemd:/docker/{ID}\n0::/\n");
        assert!(admits(&ok, &[ID]));
        // On a hybrid host the unified line decides when it is set.
        let unified = format!("4:memory:/user.slice\n0::/system.slice/docker-{ID}.scope\n");
        assert!(admits(&unified, &[ID]));
    }

    #[test]
    fn the_hosts_processes_and_other_containers_are_refused() {
        let host = v1_all("/");
        assert_eq!(
            check(&host, &[ID]).unwrap_err().reason,
            DenyReason::NotInAContainer
        );
        let session = v2("/user.slice/user-0.slice/session-1.scope");
        let d = check(&session, &[ID]).unwrap_err();
        assert_eq!(d.reason, DenyReason::NotAllowed);
        assert_eq!(
            d.cgroup.as_deref(),
            Some("/user.slice/user-0.slice/session-1.scope")
        );
        assert!(!admits(&v2(&format!("/docker/{OTHER}")), &[ID]));
        assert!(!admits(
            &v2(&format!("/system.slice/docker-{OTHER}.scope")),
            &[ID]
        ));
        // The container monitor is not the container.
        assert!(!admits(
            &v2(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            &[ID]
        ));
        assert!(!admits(
            &v2(&format!("/system.slice/crio-conmon-{ID}.scope")),
            &[ID]
        ));
    }

    #[test]
    fn a_container_cannot_nest_itself_under_our_id() {
        // Another container that may write its cgroup tree makes a child
        // named after ours: the first container segment is its own.
        assert!(!admits(&v2(&format!("/docker/{OTHER}/{ID}")), &[ID]));
        assert!(!admits(
            &v2(&format!("/system.slice/docker-{OTHER}.scope/{ID}")),
            &[ID]
        ));
        assert!(!admits(
            &v2(&format!(
                "/kubepods/besteffort/podx/{OTHER}/docker-{ID}.scope"
            )),
            &[ID]
        ));
    }

    #[test]
    fn lookalike_ids_are_refused() {
        let lookalikes = [
            format!("/docker/{ID}x"),
            format!("/docker/x{ID}"),
            format!("/docker/{ID}-evil"),
            format!("/docker/{}", &ID[..63]),
            format!("/system.slice/docker-{ID}-evil.scope"),
            format!("/system.slice/docker-{ID}.scopex"),
            format!("/system.slice/evil-{ID}.scope"),
            format!("/docker/{}", ID.to_ascii_uppercase()),
            format!("/{ID}.d"),
            format!("/docker{ID}"),
        ];
        for path in &lookalikes {
            assert!(!admits(&v2(path), &[ID]), "{path}");
        }
        // Plain runc names must match the whole segment.
        assert!(admits(&v2("/app-1"), &["app-1"]));
        assert!(!admits(&v2("/app-1x"), &["app-1"]));
        assert!(!admits(&v2("/app-10"), &["app-1"]));
        assert!(!admits(&v2("/xapp-1"), &["app-1"]));
        assert!(!admits(&v2("/app"), &["app-1"]));
    }

    #[test]
    fn id_prefixes_of_twelve_or_more_match_full_ids_only() {
        let short = &ID[..12];
        assert!(admits(&v2(&format!("/docker/{ID}")), &[short]));
        assert!(admits(
            &v2(&format!("/system.slice/docker-{ID}.scope")),
            &[&ID[..20]]
        ));
        assert!(admits(
            &v2(&format!("/docker/{ID}")),
            &[&short.to_ascii_uppercase()]
        ));
        // A prefix of another id does not match ours.
        assert!(!admits(&v2(&format!("/docker/{OTHER}")), &[short]));
        // A prefix matches a 64-hex id, not a name that happens to start with it.
        assert!(!admits(&v2(&format!("/{short}-something")), &[short]));
        assert!(!admits(&v2(&format!("/{}", &ID[..40])), &[short]));
        // Under twelve is refused at start.
        let err = CallerPolicy::new(vec![ID[..11].into()], vec![]).unwrap_err();
        assert_eq!(err, PolicyError::ShortPrefix(ID[..11].into()));
        assert!(err.to_string().contains("at least 12"));
    }

    #[test]
    fn allow_cgroup_matches_at_a_segment_boundary() {
        let p = FakeProc::new();
        p.add(1, &v2("/system.slice/app.service"))
            .add(2, &v2("/system.slice/app.service/worker"))
            .add(3, &v2("/system.slice/app.service2"))
            .add(4, &v2("/system.slice"))
            .add(5, &v2(&format!("/docker/{ID}")));
        let policy = p.policy(&[], &["/system.slice/app.service/"]);
        assert_eq!(
            policy.check(1).unwrap().matched,
            "/system.slice/app.service"
        );
        assert!(policy.check(2).is_ok());
        assert!(policy.check(3).is_err());
        assert!(policy.check(4).is_err());
        assert!(policy.check(5).is_err());
        // Either rule admits.
        let both = p.policy(&[ID], &["/system.slice/app.service"]);
        assert!(both.check(1).is_ok() && both.check(5).is_ok() && both.check(3).is_err());
    }

    #[test]
    fn bad_policies_are_refused_with_the_rule() {
        let bad = |ids: &[&str], cgroups: &[&str]| {
            CallerPolicy::new(
                ids.iter().map(|s| s.to_string()).collect(),
                cgroups.iter().map(|s| s.to_string()).collect(),
            )
            .unwrap_err()
        };
        assert_eq!(bad(&[], &[]), PolicyError::Empty);
        for id in ["", "a/b", "..", ".x", "a b", "a:b"] {
            assert!(
                matches!(bad(&[id], &[]), PolicyError::BadContainerId(_)),
                "{id:?}"
            );
        }
        for path in ["/", "", "relative", "/a/../b", "/a//b", "/a/./b"] {
            assert!(
                matches!(bad(&[], &[path]), PolicyError::BadCgroupPath(_)),
                "{path:?}"
            );
        }
    }

    #[test]
    fn pid_zero_is_refused() {
        let p = FakeProc::new();
        p.add(0, &v2(&format!("/{ID}")));
        let d = p.policy(&[ID], &[]).check(0).unwrap_err();
        assert_eq!(d.reason, DenyReason::OutsidePidNamespace);
    }

    #[test]
    fn missing_or_unreadable_proc_entries_are_refused() {
        let p = FakeProc::new();
        let policy = p.policy(&[ID], &[]);
        assert!(matches!(
            policy.check(77).unwrap_err().reason,
            DenyReason::ProcUnreadable(_)
        ));
        // The process's directory present, cgroup missing: the process is
        // going away.
        let d = p.dir.path().join("78");
        std::fs::create_dir(&d).unwrap();
        assert_eq!(
            policy.check(78).unwrap_err().reason,
            DenyReason::ProcessChanged
        );
        // cgroup present, stat missing: stat is no longer read; refused
        // here because the fixture has no cgroup filesystem.
        let d = p.dir.path().join("79");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("cgroup"), v2(&format!("/{ID}"))).unwrap();
        assert!(policy.check(79).is_err());
        // A /proc/PID that is not a directory.
        std::fs::write(p.dir.path().join("80"), "x").unwrap();
        assert!(matches!(
            policy.check(80).unwrap_err().reason,
            DenyReason::ProcUnreadable(_)
        ));
    }

    #[test]
    fn garbage_lines_are_refused() {
        let good = format!("0::/docker/{ID}\n");
        let garbage = [
            String::new(),
            "\n".into(),
            format!("{good}garbage\n"),
            format!("x::/docker/{ID}\n"),
            format!("0:memory:/docker/{ID}\n"), // the unified line lists no controllers
            format!("4::/docker/{ID}\n"),       // a v1 line must
            format!("4:mem ory:/docker/{ID}\n"),
            format!("0::docker/{ID}\n"), // relative path
            format!("-1::/docker/{ID}\n"),
            format!("0:/docker/{ID}\n"),
        ];
        for text in &garbage {
            let r = check(text, &[ID]);
            assert!(
                matches!(
                    r,
                    Err(Denial {
                        reason: DenyReason::UnexpectedFormat(_),
                        ..
                    })
                ),
                "{text:?}: {r:?}"
            );
        }
        // A path may contain ':'; a cgroup named like ours after it is no match.
        assert!(!admits(&v2(&format!("/a:{ID}")), &[ID]));
        assert!(admits(&v2(&format!("/a:b/{ID}")), &[ID]));
    }

    #[test]
    fn a_carriage_return_is_part_of_the_path() {
        // Found by the property tests: lines were split with `str::lines`,
        // which drops a '\r' before the '\n', so a cgroup named `<id>\r`
        // (a name a delegated subtree may choose) was read as `<id>`.
        let parsed = parse_cgroup_file("0::/a\r\n").unwrap();
        assert_eq!(parsed[0].path, "/a\r");
        assert!(!admits(&v2(&format!("/{ID}\r")), &[ID]));
        assert!(!admits(&v2(&format!("/docker/{ID}\r")), &[ID]));
        assert!(admits(&v2(&format!("/docker/{ID}")), &[ID]));
    }

    #[test]
    fn a_process_that_vanishes_during_the_check_is_refused() {
        // Its /proc entry goes away after the handle was opened: whatever
        // now has its pid, the handle reads nothing.
        let p = FakeProc::new();
        p.add(55, &v2(&format!("/{ID}")));
        let policy = p.policy(&[ID], &[]);
        assert!(policy.check(55).is_ok());
        let dir = ProcDir::open(p.dir.path().join("55")).unwrap();
        std::fs::remove_dir_all(p.dir.path().join("55")).unwrap();
        let d = policy.check_process(55, &dir).unwrap_err();
        assert_eq!(d.reason, DenyReason::ProcessChanged);
        // The same with a real process that exits after the handle was opened.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let dir = ProcDir::open(PathBuf::from(format!("/proc/{pid}"))).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let policy = CallerPolicy::new(vec![], vec!["/x".into()]).unwrap();
        let d = policy.check_process(pid, &dir).unwrap_err();
        assert_eq!(d.reason, DenyReason::ProcessChanged);
    }

    #[test]
    fn the_real_proc_is_read() {
        // This test process: whatever its cgroup, a policy for an id it is
        // surely not in refuses it for a reason other than an unreadable
        // /proc or an unexpected format.
        let policy = CallerPolicy::new(vec![OTHER.into()], vec![]).unwrap();
        let d = policy.check(std::process::id()).unwrap_err();
        assert!(
            matches!(
                d.reason,
                DenyReason::NotAllowed | DenyReason::NotInAContainer
            ),
            "{d:?}"
        );
        // And a policy allowing exactly its own unified cgroup admits it.
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let lines = parse_cgroup_file(&own).unwrap();
        let deciding: Vec<&str> = deciding_lines(&lines).iter().map(|l| l.path).collect();
        if deciding.iter().all(|p| *p == deciding[0]) && !deciding.is_empty() {
            let policy = CallerPolicy::new(vec![], vec![deciding[0].to_owned()]).unwrap();
            assert!(policy.check(std::process::id()).is_ok());
        }
    }

    #[test]
    fn any_process_matches_scans_proc() {
        let p = FakeProc::new();
        p.add(10, &v2("/user.slice"));
        assert!(!p.policy(&[ID], &[]).any_process_matches());
        p.add(11, &v2(&format!("/docker/{ID}")));
        assert!(p.policy(&[ID], &[]).any_process_matches());
    }
}

#[cfg(test)]
mod prop_tests;
