//! CI job identity from a process environment: GitHub Actions first, then
//! GitLab CI, Buildkite, Azure Pipelines, CircleCI and Jenkins (last: a job
//! of another system may set `JENKINS_URL` to talk to a Jenkins). Only the
//! variables named here are kept.

/// Every variable read; anything else in `environ` is skipped unread.
const KNOWN: &[&str] = &[
    "GITHUB_ACTIONS",
    "GITHUB_REPOSITORY",
    "GITHUB_WORKFLOW",
    "GITHUB_JOB",
    "GITHUB_RUN_ID",
    "GITHUB_RUN_ATTEMPT",
    "GITHUB_REF_NAME",
    "RUNNER_NAME",
    "GITLAB_CI",
    "CI_PROJECT_PATH",
    "CI_PIPELINE_NAME",
    "CI_PIPELINE_SOURCE",
    "CI_PIPELINE_ID",
    "CI_JOB_NAME",
    "CI_JOB_ID",
    "CI_COMMIT_REF_NAME",
    "CI_RUNNER_DESCRIPTION",
    "BUILDKITE",
    "BUILDKITE_REPO",
    "BUILDKITE_PIPELINE_SLUG",
    "BUILDKITE_LABEL",
    "BUILDKITE_BUILD_ID",
    "BUILDKITE_JOB_ID",
    "BUILDKITE_BRANCH",
    "BUILDKITE_AGENT_NAME",
    "TF_BUILD",
    "BUILD_REPOSITORY_NAME",
    "BUILD_REPOSITORY_URI",
    "BUILD_DEFINITIONNAME",
    "SYSTEM_JOBDISPLAYNAME",
    "AGENT_JOBNAME",
    "SYSTEM_JOBID",
    "BUILD_BUILDID",
    "SYSTEM_JOBATTEMPT",
    "BUILD_SOURCEBRANCH",
    "BUILD_SOURCEBRANCHNAME",
    "AGENT_NAME",
    "CIRCLECI",
    "CIRCLE_PROJECT_USERNAME",
    "CIRCLE_PROJECT_REPONAME",
    "CIRCLE_REPOSITORY_URL",
    "CIRCLE_WORKFLOW_ID",
    "CIRCLE_JOB",
    "CIRCLE_BUILD_NUM",
    "CIRCLE_BRANCH",
    "CIRCLE_TAG",
    "CIRCLE_NODE_INDEX",
    "JENKINS_URL",
    "BUILD_ID",
    "BUILD_NUMBER",
    "BUILD_TAG",
    "JOB_NAME",
    "STAGE_NAME",
    "GIT_URL",
    "GIT_BRANCH",
    "BRANCH_NAME",
    "NODE_NAME",
];

/// Longest value kept (a variable is not a place for an essay).
const VALUE_MAX: usize = 512;

/// The CI variables of one environment.
#[derive(Debug, Default)]
pub(super) struct CiVars {
    vars: Vec<(&'static str, String)>,
}

impl CiVars {
    /// Keeps `name=value` if `name` is one of the known variables.
    pub(super) fn offer(&mut self, name: &str, value: &str) {
        if let Some(k) = KNOWN.iter().find(|k| **k == name) {
            let mut v: String = value.chars().take(VALUE_MAX).collect();
            v.retain(|c| !c.is_control());
            if !v.is_empty() {
                self.vars.push((k, v));
            }
        }
    }

    /// The first of a name given twice (a raw `execve` can), as getenv(3)
    /// and the job's own tools read it.
    fn get(&self, name: &str) -> Option<String> {
        self.vars
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    }

    fn is(&self, name: &str, value: &str) -> bool {
        self.get(name)
            .is_some_and(|v| v.eq_ignore_ascii_case(value))
    }

    /// The job identity, if these variables name a CI system.
    pub(super) fn identify(&self) -> Option<CiJob> {
        let jenkins_tag = self
            .get("BUILD_TAG")
            .is_some_and(|t| t.starts_with("jenkins-"));
        let jenkins_build = self.get("BUILD_ID").is_some() || self.get("BUILD_NUMBER").is_some();
        // A system's own marker first, then the variables that merely hint
        // at one: a GitLab job whose release tool sets `GITHUB_REPOSITORY`
        // is a GitLab job.
        let system = if self.is("GITHUB_ACTIONS", "true") {
            System::GitHub
        } else if self.is("GITLAB_CI", "true") {
            System::GitLab
        } else if self.is("BUILDKITE", "true") {
            System::Buildkite
        } else if self.is("TF_BUILD", "true") {
            System::Azure
        } else if self.is("CIRCLECI", "true") {
            System::Circle
        } else if jenkins_tag {
            System::Jenkins
        } else if self.get("GITHUB_REPOSITORY").is_some() {
            System::GitHub
        } else if self.get("CI_PROJECT_PATH").is_some() {
            System::GitLab
        } else if self.get("BUILDKITE_BUILD_ID").is_some() {
            System::Buildkite
        } else if self.get("JENKINS_URL").is_some() && jenkins_build {
            System::Jenkins
        } else {
            return None;
        };
        if system == System::GitHub {
            return Some(CiJob {
                system: "github-actions",
                repository: self.get("GITHUB_REPOSITORY"),
                workflow: self.get("GITHUB_WORKFLOW"),
                job: self.get("GITHUB_JOB"),
                // GitHub exposes no id of the job within the run.
                job_id: None,
                run_id: self.get("GITHUB_RUN_ID"),
                run_attempt: self.get("GITHUB_RUN_ATTEMPT"),
                ref_name: self.get("GITHUB_REF_NAME"),
                runner: self.get("RUNNER_NAME"),
            });
        }
        if system == System::GitLab {
            return Some(CiJob {
                system: "gitlab",
                repository: self.get("CI_PROJECT_PATH"),
                workflow: self
                    .get("CI_PIPELINE_NAME")
                    .or_else(|| self.get("CI_PIPELINE_SOURCE")),
                job: self.get("CI_JOB_NAME"),
                job_id: self.get("CI_JOB_ID"),
                run_id: self.get("CI_PIPELINE_ID"),
                run_attempt: None,
                ref_name: self.get("CI_COMMIT_REF_NAME"),
                runner: self.get("CI_RUNNER_DESCRIPTION"),
            });
        }
        if system == System::Buildkite {
            return Some(CiJob {
                system: "buildkite",
                repository: self
                    .get("BUILDKITE_REPO")
                    .and_then(|r| repo_path(&r))
                    .or_else(|| self.get("BUILDKITE_PIPELINE_SLUG")),
                workflow: self.get("BUILDKITE_PIPELINE_SLUG"),
                job: self.get("BUILDKITE_LABEL"),
                job_id: self.get("BUILDKITE_JOB_ID"),
                run_id: self.get("BUILDKITE_BUILD_ID"),
                run_attempt: None,
                ref_name: self.get("BUILDKITE_BRANCH"),
                runner: self.get("BUILDKITE_AGENT_NAME"),
            });
        }
        if system == System::Azure {
            return Some(CiJob {
                system: "azure-pipelines",
                // `owner/name` for GitHub repositories; for Azure Repos,
                // whose name is the repository's alone, `org/project/name`
                // from its URL.
                repository: self
                    .get("BUILD_REPOSITORY_NAME")
                    .filter(|n| n.contains('/'))
                    .or_else(|| self.get("BUILD_REPOSITORY_URI").and_then(|u| repo_path(&u)))
                    .or_else(|| self.get("BUILD_REPOSITORY_NAME")),
                workflow: self.get("BUILD_DEFINITIONNAME"),
                job: self
                    .get("SYSTEM_JOBDISPLAYNAME")
                    .or_else(|| self.get("AGENT_JOBNAME")),
                job_id: self.get("SYSTEM_JOBID"),
                run_id: self.get("BUILD_BUILDID"),
                run_attempt: self.get("SYSTEM_JOBATTEMPT"),
                // The full branch (`feature/x`), not the last segment that
                // BUILD_SOURCEBRANCHNAME gives.
                ref_name: self
                    .get("BUILD_SOURCEBRANCH")
                    .map(|r| short_ref(&r))
                    .or_else(|| self.get("BUILD_SOURCEBRANCHNAME")),
                runner: self.get("AGENT_NAME"),
            });
        }
        if system == System::Circle {
            let repository = match (
                self.get("CIRCLE_PROJECT_USERNAME"),
                self.get("CIRCLE_PROJECT_REPONAME"),
            ) {
                (Some(owner), Some(name)) => Some(format!("{owner}/{name}")),
                _ => self
                    .get("CIRCLE_REPOSITORY_URL")
                    .and_then(|r| repo_path(&r)),
            };
            return Some(CiJob {
                system: "circleci",
                repository,
                // CircleCI exposes no workflow name to the job, only the
                // id of the workflow run (below, as the run id).
                workflow: None,
                job: self.get("CIRCLE_JOB"),
                job_id: self.get("CIRCLE_BUILD_NUM"),
                run_id: self.get("CIRCLE_WORKFLOW_ID"),
                run_attempt: None,
                ref_name: self.get("CIRCLE_BRANCH").or_else(|| self.get("CIRCLE_TAG")),
                // The executor's index within a parallel job: the nearest
                // thing to a runner name CircleCI gives.
                runner: self.get("CIRCLE_NODE_INDEX"),
            });
        }
        Some(CiJob {
            system: "jenkins",
            repository: self.get("GIT_URL").and_then(|r| repo_path(&r)),
            // The pipeline (`folder/pipeline/branch` for multibranch).
            workflow: self.get("JOB_NAME"),
            job: self.get("STAGE_NAME"),
            job_id: None,
            run_id: self.get("BUILD_NUMBER").or_else(|| self.get("BUILD_ID")),
            run_attempt: None,
            ref_name: self
                .get("BRANCH_NAME")
                .or_else(|| self.get("GIT_BRANCH"))
                .map(|r| short_ref(&r)),
            runner: self.get("NODE_NAME"),
        })
    }
}

/// The CI system a job's variables name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    GitHub,
    GitLab,
    Buildkite,
    Azure,
    Circle,
    Jenkins,
}

/// A branch or tag without `refs/heads/`, `refs/tags/`, `refs/` or a
/// remote's `origin/` in front.
fn short_ref(r: &str) -> String {
    ["refs/heads/", "refs/tags/", "refs/", "origin/"]
        .iter()
        .find_map(|p| r.strip_prefix(p))
        .unwrap_or(r)
        .to_string()
}

/// `owner/name` from a git remote (`https://user:token@host/owner/name.git`,
/// `git@host:owner/name.git`); credentials never survive, in the user part
/// or in a query string (`...name.git?access_token=...`). The forges whose
/// URLs put more than the repository's path there give the same name over
/// HTTP and SSH: Bitbucket Server's `/scm/PROJ/name.git` is `PROJ/name`,
/// Azure Repos' `dev.azure.com/org/project/_git/name`,
/// `ssh.dev.azure.com:v3/org/project/name` and
/// `org.visualstudio.com/[DefaultCollection/]project/_git/name` are
/// `org/project/name`.
fn repo_path(url: &str) -> Option<String> {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let (authority, rest) = match url.split_once("://") {
        Some((_, r)) => r.split_once('/')?,
        None => url.split_once(':')?,
    };
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host = host
        .split(':')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut p = rest.trim_matches('/').trim_end_matches(".git").to_string();
    if p.contains('@') {
        return None;
    }
    let azure_ssh = host == "ssh.dev.azure.com" || host == "vs-ssh.visualstudio.com";
    if azure_ssh && let Some(r) = p.strip_prefix("v3/") {
        p = r.to_string();
    } else if host == "dev.azure.com" || host.ends_with(".visualstudio.com") {
        p = p.replacen("/_git/", "/", 1);
        if let Some(org) = host.strip_suffix(".visualstudio.com") {
            let r = p.strip_prefix("DefaultCollection/").unwrap_or(&p);
            p = format!("{org}/{r}");
        }
    } else if let Some(r) = p.strip_prefix("scm/")
        && r.contains('/')
    {
        p = r.to_string();
    }
    (!p.is_empty()).then_some(p)
}

/// A CI job, as recorded in `Attribution`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CiJob {
    pub system: &'static str,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub job: Option<String>,
    pub job_id: Option<String>,
    pub run_id: Option<String>,
    pub run_attempt: Option<String>,
    pub ref_name: Option<String>,
    pub runner: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> CiVars {
        let mut v = CiVars::default();
        for (k, val) in list {
            v.offer(k, val);
        }
        v
    }

    #[test]
    fn keeps_only_known_names() {
        let v = vars(&[
            ("OPENAI_API_KEY", "sk-secret"),
            ("GITHUB_TOKEN", "ghs_x"),
            ("HOME", "/root"),
        ]);
        assert!(v.vars.is_empty());
        assert!(v.identify().is_none());
    }

    #[test]
    fn github_first() {
        let v = vars(&[
            ("CI_PROJECT_PATH", "g/p"),
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_REPOSITORY", "acme/app"),
            ("GITHUB_JOB", "test"),
        ]);
        let j = v.identify().expect("github");
        assert_eq!(j.system, "github-actions");
        assert_eq!(j.repository.as_deref(), Some("acme/app"));
    }

    #[test]
    fn a_systems_own_marker_beats_another_systems_hint() {
        for (list, system, repository) in [
            (
                &[
                    ("GITLAB_CI", "true"),
                    ("CI_PROJECT_PATH", "g/p"),
                    ("GITHUB_REPOSITORY", "acme/mirror"),
                ][..],
                "gitlab",
                Some("g/p"),
            ),
            (
                &[
                    ("BUILDKITE", "true"),
                    ("BUILDKITE_REPO", "git@github.com:acme/app.git"),
                    ("CI_PROJECT_PATH", "g/p"),
                ][..],
                "buildkite",
                Some("acme/app"),
            ),
            (
                &[
                    ("TF_BUILD", "True"),
                    ("BUILD_REPOSITORY_NAME", "acme/app"),
                    ("GITHUB_REPOSITORY", "acme/mirror"),
                ][..],
                "azure-pipelines",
                Some("acme/app"),
            ),
            (
                &[
                    ("BUILD_TAG", "jenkins-app-7"),
                    ("GIT_URL", "https://git.example.com/acme/app.git"),
                    ("GITHUB_REPOSITORY", "acme/mirror"),
                ][..],
                "jenkins",
                Some("acme/app"),
            ),
            // A hint alone still names its system.
            (
                &[("GITHUB_REPOSITORY", "acme/app")][..],
                "github-actions",
                Some("acme/app"),
            ),
        ] {
            let j = vars(list).identify().expect("a job");
            assert_eq!(
                (j.system, j.repository.as_deref()),
                (system, repository),
                "{list:?}"
            );
        }
    }

    #[test]
    fn gitlab_and_buildkite() {
        let j = vars(&[
            ("GITLAB_CI", "true"),
            ("CI_PROJECT_PATH", "group/proj"),
            ("CI_PIPELINE_SOURCE", "push"),
            ("CI_PIPELINE_ID", "77"),
            ("CI_JOB_NAME", "lint"),
            ("CI_COMMIT_REF_NAME", "main"),
            ("CI_RUNNER_DESCRIPTION", "r1"),
        ])
        .identify()
        .expect("gitlab");
        assert_eq!(
            (
                j.system,
                j.repository.as_deref(),
                j.workflow.as_deref(),
                j.run_id.as_deref(),
                j.job.as_deref()
            ),
            (
                "gitlab",
                Some("group/proj"),
                Some("push"),
                Some("77"),
                Some("lint")
            )
        );
        let j = vars(&[
            ("BUILDKITE", "true"),
            (
                "BUILDKITE_REPO",
                "https://x-access-token:ghs_SECRET@github.com/acme/app.git",
            ),
            ("BUILDKITE_PIPELINE_SLUG", "app"),
            ("BUILDKITE_LABEL", ":rust: test"),
            ("BUILDKITE_BUILD_ID", "0190"),
        ])
        .identify()
        .expect("buildkite");
        assert_eq!(j.repository.as_deref(), Some("acme/app"));
        assert_eq!(j.job.as_deref(), Some(":rust: test"));
        assert_eq!(
            repo_path("git@github.com:acme/lib.git").as_deref(),
            Some("acme/lib")
        );
        for url in [
            "https://git.example.com/acme/lib.git?access_token=SECRET1",
            "https://oauth2:SECRET1@git.example.com/acme/lib#SECRET1",
        ] {
            assert_eq!(repo_path(url).as_deref(), Some("acme/lib"), "{url}");
        }
    }

    /// Forges whose remotes hold more than the repository's path name it
    /// the same way over HTTP and SSH.
    #[test]
    fn repositories_from_self_hosted_and_azure_remotes() {
        for (url, want) in [
            ("https://bitbucket.acme.com/scm/proj/app.git", "proj/app"),
            ("ssh://git@bitbucket.acme.com:7999/proj/app.git", "proj/app"),
            ("https://dev.azure.com/acme/proj/_git/app", "acme/proj/app"),
            (
                "https://acme@dev.azure.com/acme/proj/_git/app",
                "acme/proj/app",
            ),
            ("git@ssh.dev.azure.com:v3/acme/proj/app", "acme/proj/app"),
            (
                "https://acme.visualstudio.com/DefaultCollection/proj/_git/app",
                "acme/proj/app",
            ),
            (
                "https://acme.visualstudio.com/proj/_git/app",
                "acme/proj/app",
            ),
            (
                "acme@vs-ssh.visualstudio.com:v3/acme/proj/app",
                "acme/proj/app",
            ),
            // A repository that is itself called `scm` keeps its name.
            ("https://github.com/scm/tools.git", "scm/tools"),
            ("https://git.example.com/scm.git", "scm"),
        ] {
            assert_eq!(repo_path(url).as_deref(), Some(want), "{url}");
        }
        // Azure Pipelines on Azure Repos: BUILD_REPOSITORY_NAME is the
        // name alone; on GitHub it is owner/name.
        let azure = |name: &str, uri: &str| {
            vars(&[
                ("TF_BUILD", "True"),
                ("BUILD_REPOSITORY_NAME", name),
                ("BUILD_REPOSITORY_URI", uri),
            ])
            .identify()
            .expect("azure")
            .repository
        };
        assert_eq!(
            azure("app", "https://acme@dev.azure.com/acme/proj/_git/app").as_deref(),
            Some("acme/proj/app")
        );
        assert_eq!(
            azure("acme/app", "https://github.com/acme/app").as_deref(),
            Some("acme/app")
        );
    }

    /// A name given twice in one environment (a raw `execve`): the first,
    /// as getenv(3) and the job's own tools read it.
    #[test]
    fn a_variable_given_twice_is_read_as_getenv_reads_it() {
        let j = vars(&[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_REPOSITORY", "acme/app"),
            ("GITHUB_REPOSITORY", "other/decoy"),
        ])
        .identify()
        .expect("github");
        assert_eq!(j.repository.as_deref(), Some("acme/app"));
    }
}
