/*
 * The device proxies of a job step (remote context, slurmstepd).
 *
 * When the step's job asked for --proxy=on, slurm_spank_user_init (once per
 * node and step, before the tasks start, with the job user's identity)
 * runs the Python helper
 *     PYTHON -m slurm_singularity.proxy.step start --devices N --job JOB.STEP
 * as the job's user, reads the NAME=VALUE lines it prints and puts them into
 * the step's environment (SINGULARITY_PROXY_ADDRS and friends), so every
 * task finds its device's proxy. slurm_spank_exit (after the tasks ended,
 * so after their last checkpoint) stops the proxies by the pids in their pid
 * files (SIGTERM, then SIGKILL after STOP_TIMEOUT_S) and deletes their
 * directory. A helper that fails fails the step with its message.
 *
 * Why a helper: starting a proxy, waiting until it serves and stopping it
 * by pid is already written and tested in Python (proxy/api.py); the C
 * side only forks, drops to the job's user and reads a pipe. PYTHON comes
 * from plugstack.conf ("python=/path/to/.venv/bin/python").
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/slurm.h>

#include "proxies.h"

#define HELPER_MODULE "slurm_singularity.proxy.step"
#define START_TIMEOUT_S 120
#define STOP_TIMEOUT_S 10
#define OUTPUT_MAX 16384
#define STATE_VAR "SINGULARITY_PROXY_STATE"
#define RING_VAR "SINGULARITY_PROXY_RING_BYTES"
#define PROXY_FAILED_EXIT 1	/* exit code of a task whose proxies failed */

static char python_path[4096];
static char state_dir[4096];	/* set while this step's proxies run */
static int start_failed;	/* proxies_start failed: no task may run */

int proxies_configure(int ac, char **av)
{
	for (int i = 0; i < ac; i++) {
		if (strncmp(av[i], "python=", 7) == 0) {
			if (av[i][7] != '/' || strlen(av[i] + 7) >= sizeof(python_path)) {
				slurm_error("singularity: plugstack.conf: %s: expected an "
					    "absolute path", av[i]);
				return -1;
			}
			strcpy(python_path, av[i] + 7);
		} else {
			slurm_error("singularity: plugstack.conf: unknown argument '%s' "
				    "(known: python=PATH)", av[i]);
			return -1;
		}
	}
	return 0;
}

const char *proxies_python(void)
{
	return python_path;
}

/* Seconds since some fixed point, for timeouts. */
static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/*
 * Run the helper with argv (argv[0] = python), stdout and stderr into out
 * (NUL-terminated, truncated to len), stdin from /dev/null, and envp as its
 * whole environment. When as_user, the child first makes the effective
 * user and group (the job's, in slurm_spank_user_init) its real and saved
 * ones too, so the helper and its proxies run as the job's user only.
 * Returns the exit status (0..255), or -1 (killed, timed out, or could not
 * run; out says why).
 */
static int run_helper(char *const argv[], char *const envp[], int as_user, int timeout_s,
		      char *out, size_t len)
{
	int fds[2], status = 0;
	size_t used = 0;
	double deadline = now_s() + timeout_s;
	pid_t pid;

	out[0] = '\0';
	if (pipe2(fds, O_CLOEXEC) != 0) {
		snprintf(out, len, "pipe: %s", strerror(errno));
		return -1;
	}
	pid = fork();
	if (pid < 0) {
		snprintf(out, len, "fork: %s", strerror(errno));
		close(fds[0]);
		close(fds[1]);
		return -1;
	}
	if (pid == 0) {
		int null = open("/dev/null", O_RDONLY);
		sigset_t none;

		/* slurmstepd blocks and ignores signals that the proxies must
		 * act on (SIGTERM): exec with a clean slate */
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		for (int sig = 1; sig < NSIG; sig++)
			signal(sig, SIG_DFL);

		if (null < 0 || dup2(null, 0) < 0 || dup2(fds[1], 1) < 0 || dup2(fds[1], 2) < 0)
			_exit(126);
		if (as_user) {
			gid_t g = getegid();
			uid_t u = geteuid();

			if (setresgid(g, g, g) != 0 || setresuid(u, u, u) != 0) {
				dprintf(2, "cannot become uid %u gid %u: %s\n", u, g,
					strerror(errno));
				_exit(126);
			}
		}
		setsid();
		execve(argv[0], argv, envp);
		dprintf(2, "cannot run %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	close(fds[1]);
	for (;;) {
		struct pollfd p = { .fd = fds[0], .events = POLLIN };
		int left_ms = (int)((deadline - now_s()) * 1000);
		ssize_t n;

		if (left_ms <= 0) {
			kill(pid, SIGKILL);
			snprintf(out, len, "%s did not finish within %d s", HELPER_MODULE,
				 timeout_s);
			waitpid(pid, NULL, 0);
			close(fds[0]);
			return -1;
		}
		if (poll(&p, 1, left_ms) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (!(p.revents & (POLLIN | POLLHUP)))
			continue;
		if (used + 1 < len) {
			n = read(fds[0], out + used, len - 1 - used);
		} else {
			char sink[4096];

			n = read(fds[0], sink, sizeof(sink));
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		if (used + 1 < len)
			used += n;
		out[used] = '\0';
	}
	close(fds[0]);
	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR) {
			snprintf(out + used, len - used, "waitpid: %s", strerror(errno));
			return -1;
		}
	}
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	snprintf(out + used, len - used, "%s%s was killed by signal %d",
		 used ? "; " : "", HELPER_MODULE, WTERMSIG(status));
	return -1;
}

/* Devices of this step on this node: the entries of CUDA_VISIBLE_DEVICES
 * (what the tasks will use), else SLURM_GPUS_ON_NODE; 0 when neither. */
static int step_devices(spank_t sp, char *visible, size_t len)
{
	char buf[64];
	int n = 0;

	visible[0] = '\0';
	if (spank_getenv(sp, "CUDA_VISIBLE_DEVICES", visible, len) == ESPANK_SUCCESS &&
	    visible[0] != '\0') {
		n = 1;
		for (const char *c = visible; *c; c++)
			n += (*c == ',');
		return n;
	}
	if (spank_getenv(sp, "SLURM_GPUS_ON_NODE", buf, sizeof(buf)) == ESPANK_SUCCESS)
		return atoi(buf);
	return 0;
}

/* Trim a helper's output to its last non-empty line, for a log message. */
static const char *last_line(char *out)
{
	char *end = out + strlen(out);

	while (end > out && (end[-1] == '\n' || end[-1] == ' '))
		*--end = '\0';
	char *nl = strrchr(out, '\n');
	return nl ? nl + 1 : out;
}

static int start(spank_t sp);

/*
 * Slurm 22.05 logs a failed slurm_spank_user_init, and a failed
 * slurm_spank_task_init, and runs the tasks anyway (seen on the local
 * cluster); so the failure is remembered here and each task process ends
 * itself in slurm_spank_task_init, before its execve (proxies_check_task).
 */
int proxies_start(spank_t sp)
{
	int rc = start(sp);

	start_failed = rc != 0;
	return rc;
}

void proxies_check_task(void)
{
	if (!start_failed)
		return;
	slurm_error("singularity: not starting the task: the step's device proxies "
		    "did not start (see the error above)");
	_exit(PROXY_FAILED_EXIT);
}

static int start(spank_t sp)
{
	char want[8], visible[1024], job[64], devices[16], out[OUTPUT_MAX];
	char cvd_env[1100], ring[64], ring_env[128];
	uint32_t job_id = 0, step_id = 0;
	int n, rc;

	if (spank_getenv(sp, "SINGULARITY_PROXY", want, sizeof(want)) != ESPANK_SUCCESS ||
	    strcmp(want, "on") != 0)
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS)
		return 0;
	if (step_id == SLURM_BATCH_SCRIPT || step_id == SLURM_EXTERN_CONT ||
	    step_id == SLURM_INTERACTIVE_STEP)
		return 0;	/* the workers run in srun steps; see docs/proxy.md */
	if (python_path[0] == '\0') {
		slurm_error("singularity: --proxy=on: plugstack.conf gives no python=PATH "
			    "for starting the device proxies");
		return -1;
	}
	n = step_devices(sp, visible, sizeof(visible));
	if (n < 1) {
		slurm_error("singularity: --proxy=on: step %u.%u has no GPU on this node "
			    "(ask for one with --gres=gpu:N)", job_id, step_id);
		return -1;
	}
	snprintf(job, sizeof(job), "%u.%u", job_id, step_id);
	snprintf(devices, sizeof(devices), "%d", n);
	snprintf(cvd_env, sizeof(cvd_env), "CUDA_VISIBLE_DEVICES=%s", visible);
	if (spank_getenv(sp, RING_VAR, ring, sizeof(ring)) != ESPANK_SUCCESS)
		ring[0] = '\0';
	snprintf(ring_env, sizeof(ring_env), "%s=%s", RING_VAR, ring);
	{
		char *argv[] = { python_path, "-m", HELPER_MODULE, "start", "--devices",
				 devices, "--job", job, NULL };
		/* the helper's whole environment: the job's GPUs, and the
		 * proxy setting a job may give */
		char *envp[5] = { "PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", NULL, NULL,
				  NULL };
		int e = 2;

		if (visible[0])
			envp[e++] = cvd_env;
		if (ring[0])
			envp[e++] = ring_env;

		rc = run_helper(argv, envp, 1, START_TIMEOUT_S, out, sizeof(out));
	}
	if (rc != 0) {
		/* the helper's last line says "a device proxy failed to start: ..." */
		slurm_error("singularity: step %s: %s", job, last_line(out));
		return -1;
	}
	for (char *line = strtok(out, "\n"); line != NULL; line = strtok(NULL, "\n")) {
		char *eq = strchr(line, '=');

		if (eq == NULL || strncmp(line, "SINGULARITY_", 12) != 0)
			continue;
		*eq = '\0';
		if (strcmp(line, STATE_VAR) == 0)
			snprintf(state_dir, sizeof(state_dir), "%s", eq + 1);
		if (spank_setenv(sp, line, eq + 1, 1) != ESPANK_SUCCESS) {
			slurm_error("singularity: step %s: cannot set %s", job, line);
			proxies_stop();
			return -1;
		}
	}
	slurm_info("singularity: step %s: %d device proxies under %s", job, n, state_dir);
	return 0;
}

/* The pid in a proxy's pid file, if that process's command line names the
 * proxy's socket (so a pid that was reused is left alone); else 0. */
static pid_t proxy_pid(const char *proxy_dir, const char *pid_name)
{
	char path[4608], socket[4608], cmdline[8192];
	size_t n;
	long pid = 0;
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", proxy_dir, pid_name);
	snprintf(socket, sizeof(socket), "%s/%.*s", proxy_dir,
		 (int)(strlen(pid_name) - strlen(".pid")), pid_name);
	f = fopen(path, "r");
	if (f == NULL)
		return 0;
	if (fscanf(f, "%ld", &pid) != 1 || pid <= 1)
		pid = 0;
	fclose(f);
	if (pid == 0)
		return 0;
	snprintf(path, sizeof(path), "/proc/%ld/cmdline", pid);
	f = fopen(path, "r");
	if (f == NULL)
		return 0;
	n = fread(cmdline, 1, sizeof(cmdline) - 1, f);
	fclose(f);
	cmdline[n] = '\0';
	for (size_t i = 0; i < n; i += strlen(cmdline + i) + 1)
		if (strcmp(cmdline + i, socket) == 0)
			return (pid_t)pid;
	return 0;
}

/*
 * Delete the step's state directory, STATE/proxy/<files>, as root but
 * through file descriptors opened with O_NOFOLLOW: the directory belongs to
 * the job's user, who could swap a path for a symbolic link while a
 * path-walking delete runs. unlinkat never follows the last component, and
 * a directory that became a link is not opened, so nothing outside the
 * step's own directory can be removed. Returns 0 or -1 (errno set).
 */
static int remove_state_dir(const char *dir)
{
	int top, sub, rc = 0;
	DIR *d;
	struct dirent *e;

	top = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (top < 0)
		return errno == ENOENT ? 0 : -1;
	sub = openat(top, "proxy", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (sub >= 0 && (d = fdopendir(sub)) != NULL) {
		while ((e = readdir(d)) != NULL) {
			if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
				continue;
			if (unlinkat(dirfd(d), e->d_name, 0) != 0 && errno != ENOENT)
				rc = -1;
		}
		closedir(d);	/* closes sub */
	} else if (sub >= 0) {
		close(sub);
	}
	if (unlinkat(top, "proxy", AT_REMOVEDIR) != 0 && errno != ENOENT)
		rc = -1;
	close(top);
	if (rc == 0 && rmdir(dir) != 0 && errno != ENOENT)
		rc = -1;
	return rc;
}

/*
 * Done here, not by the helper: when slurm_spank_exit runs, slurmstepd
 * kills what is left of the step's processes, a helper started then
 * included (seen on Slurm 22.05 with proctrack/linuxproc).
 */
int proxies_stop(void)
{
	char proxy_dir[4200];
	pid_t pids[256];
	int n = 0, rc = 0;
	const char *base = strrchr(state_dir, '/');
	struct dirent *e;
	DIR *d;

	if (state_dir[0] == '\0')
		return 0;
	snprintf(proxy_dir, sizeof(proxy_dir), "%s/proxy", state_dir);
	d = opendir(proxy_dir);
	while (d != NULL && (e = readdir(d)) != NULL && n < 256) {
		size_t len = strlen(e->d_name);

		if (len > 9 && strcmp(e->d_name + len - 9, ".sock.pid") == 0) {
			pid_t pid = proxy_pid(proxy_dir, e->d_name);

			if (pid > 0 && kill(pid, SIGTERM) == 0)
				pids[n++] = pid;
		}
	}
	if (d != NULL)
		closedir(d);
	for (double deadline = now_s() + STOP_TIMEOUT_S;;) {
		int alive = 0;

		for (int i = 0; i < n; i++)
			alive += pids[i] > 0 && kill(pids[i], 0) == 0;
		if (alive == 0 || now_s() > deadline)
			break;
		usleep(50000);
	}
	for (int i = 0; i < n; i++) {
		if (kill(pids[i], 0) == 0) {
			slurm_error("singularity: device proxy pid %d ignored SIGTERM; killing it",
				    (int)pids[i]);
			kill(pids[i], SIGKILL);
		}
	}
	if (base != NULL && strncmp(base + 1, "singularity-proxy-", 18) == 0 &&
	    remove_state_dir(state_dir) != 0) {
		slurm_error("singularity: cannot delete %s: %s", state_dir, strerror(errno));
		rc = -1;
	}
	slurm_info("singularity: stopped %d device proxies, deleted %s", n, state_dir);
	state_dir[0] = '\0';
	return rc;
}
