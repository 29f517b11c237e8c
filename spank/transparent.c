/*
 * --transparent (remote context): the batch task of a transparent job hands
 * itself over to the keeper, slurm_singularity.transparent.keeper, which runs
 * the script as the job's user and dumps / restores its whole process tree
 * with CRIU (see that module for why and how).
 *
 * slurm_spank_task_init_privileged (in the task's process, still root): fork
 * the keeper; it waits on a socket. slurm_spank_task_init (the same process,
 * now the user's, stdio and environment final): send fds 0-2 and the
 * environment (a memfd) over the socket, then only forward Slurm's signals
 * (preemption signals the batch task alone) and exit with the keeper's code.
 * The keeper is exec'd with a clean environment and `python -I` (no
 * PYTHONPATH, no user site), the checkout this plugin was built in first on
 * sys.path, so root never runs the user's code or libraries. Steps other
 * than the batch step are refused: an srun step's processes live outside the
 * tree that is checkpointed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <unistd.h>

#include <slurm/slurm.h>

#include "contexts.h"
#include "options.h"
#include "proxies.h"

#define KEEPER_CODE \
	"import sys; r = sys.argv.pop(1); r and sys.path.insert(0, r); " \
	"from slurm_singularity.transparent.keeper import main; sys.exit(main(sys.argv[1:]))"
#define MAX_ARGS 4096

/* The checkout this plugin was built in (<root>/spank/singularity.so), when
 * it holds the keeper; "" otherwise (the installed package is used). */
static void checkout_root(char *out, size_t len)
{
	Dl_info info;
	char buf[4096], probe[4096], path[4200];
	struct stat st;

	out[0] = '\0';
	if (dladdr((void *)checkout_root, &info) == 0 || info.dli_fname == NULL)
		return;
	if (realpath(info.dli_fname, buf) == NULL)
		return;
	snprintf(probe, sizeof(probe), "%s", dirname(dirname(buf)));
	snprintf(path, sizeof(path), "%s/slurm_singularity/transparent/keeper.py", probe);
	if (stat(path, &st) == 0 && st.st_uid == 0 && strlen(probe) < len)
		strcpy(out, probe);
}

static int env_memfd(char **env)
{
	int fd = memfd_create("singularity-job-env", 0);

	if (fd < 0)
		return -1;
	for (char **e = env; e != NULL && *e != NULL; e++) {
		size_t n = strlen(*e) + 1;
		if (write(fd, *e, n) != (ssize_t)n) {
			close(fd);
			return -1;
		}
	}
	if (lseek(fd, 0, SEEK_SET) != 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Set by transparent_task_privileged in the task process: the keeper's pid
 * and our end of the socket that hands it the task's stdio and environment. */
static pid_t keeper_pid;
static int keeper_sock = -1;

/* In the keeper (root, just forked): wait for the task's fds 0, 1, 2 and its
 * environment (a memfd), then exec the keeper. Never returns. */
static void keeper_exec(int sock, char **args, const char *python, uint32_t job_id)
{
	char *const clean_env[] = {
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LANG=C.UTF-8", NULL };
	char data;
	char cbuf[CMSG_SPACE(4 * sizeof(int))];
	struct iovec iov = { .iov_base = &data, .iov_len = 1 };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	int fds[4];
	char sfd[16], ssock[16];
	pid_t parent = getppid();

	/* The task gone (SIGKILL after the grace time) is a preemption too. */
	if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() != parent)
		_exit(1);
	if (recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != 1 || (cm = CMSG_FIRSTHDR(&msg)) == NULL
	    || cm->cmsg_type != SCM_RIGHTS || cm->cmsg_len != CMSG_LEN(sizeof(fds)))
		_exit(1);	/* the task died before handing over: nothing to run */
	memcpy(fds, CMSG_DATA(cm), sizeof(fds));
	/* The socket stays open: the task forwards Slurm's signals on it (it runs
	 * as the user and may not signal root's keeper). */
	sock = dup(sock);
	for (int i = 0; i < 3; i++)
		if (dup2(fds[i], i) < 0)
			_exit(1);
	fds[3] = dup(fds[3]);	/* without O_CLOEXEC: the keeper reads it */
	snprintf(sfd, sizeof(sfd), "%d", fds[3]);
	snprintf(ssock, sizeof(ssock), "%d", sock);
	for (char **a = args; *a != NULL; a++) {
		if (strcmp(*a, "ENV_FD") == 0)
			*a = sfd;
		else if (strcmp(*a, "SIGNAL_FD") == 0)
			*a = ssock;
	}
	/* slurmstepd forked the task with its signals blocked (it unblocks them
	 * just before exec'ing a task): the keeper must receive Slurm's. */
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (int sig = 1; sig < NSIG; sig++)
		if (sig != SIGKILL && sig != SIGSTOP)
			signal(sig, SIG_DFL);
	(void)fcntl(sock, F_SETFD, 0);
	execve(python, args, clean_env);
	fprintf(stderr, "singularity: --transparent: job %u: cannot run the keeper %s: %m\n",
		job_id, python);
	_exit(1);
}

int transparent_task_privileged(spank_t sp)
{
	uint32_t job_id, step_id;
	uid_t uid;
	gid_t gid;
	int argc, sv[2];
	char **argv;
	static char root[4096], sjob[16], suid[16], sgid[16];
	const char *python = proxies_python();
	static char *args[MAX_ARGS];
	int n = 0;

	if (singularity_opts.value[OPT_TRANSPARENT] == NULL)
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_JOB_UID, &uid) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_JOB_GID, &gid) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS) {
		slurm_error("singularity: --transparent: cannot read the job's id, user or "
			    "command from Slurm");
		return -1;
	}
	if (step_id != SLURM_BATCH_SCRIPT) {
		slurm_error("singularity: --transparent: job %u: srun steps cannot run in a "
			    "transparent job (their processes would not be checkpointed with "
			    "the batch script's tree); run the program directly in the script",
			    job_id);
		/* Slurm 22.05 runs the task even when this hook fails: end it. */
		_exit(1);
	}
	if (python[0] == '\0') {
		slurm_error("singularity: --transparent: plugstack.conf names no python=PATH "
			    "for the keeper");
		return -1;
	}
	if (argc < 1 || argc > MAX_ARGS - 16) {
		slurm_error("singularity: --transparent: job %u: bad command (%d arguments)",
			    job_id, argc);
		return -1;
	}
	checkout_root(root, sizeof(root));
	snprintf(sjob, sizeof(sjob), "%u", job_id);
	snprintf(suid, sizeof(suid), "%u", (unsigned)uid);
	snprintf(sgid, sizeof(sgid), "%u", (unsigned)gid);
	args[n++] = (char *)python;
	args[n++] = "-I";
	args[n++] = "-c";
	args[n++] = KEEPER_CODE;
	args[n++] = root;
	args[n++] = "--job-id";
	args[n++] = sjob;
	args[n++] = "--uid";
	args[n++] = suid;
	args[n++] = "--gid";
	args[n++] = sgid;
	args[n++] = "--env-fd";
	args[n++] = "ENV_FD";
	args[n++] = "--signal-fd";
	args[n++] = "SIGNAL_FD";
	args[n++] = "--";
	for (int i = 0; i < argc; i++)
		args[n++] = argv[i];
	args[n] = NULL;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
		slurm_error("singularity: --transparent: job %u: socketpair: %m", job_id);
		return -1;
	}
	keeper_pid = fork();
	if (keeper_pid < 0) {
		slurm_error("singularity: --transparent: job %u: fork: %m", job_id);
		return -1;
	}
	if (keeper_pid == 0) {
		close(sv[0]);
		keeper_exec(sv[1], args, python, job_id);
	}
	close(sv[1]);
	keeper_sock = sv[0];
	return 0;
}

/* Slurm's signals to the task (preemption sends them to the batch task
 * alone) are the keeper's to act on: forward each as one byte. */
static void forward_signal(int sig)
{
	unsigned char b = (unsigned char)sig;
	int saved = errno;

	if (write(keeper_sock, &b, 1) < 0) {
		/* the keeper is gone; waitpid returns soon */
	}
	errno = saved;
}

/*
 * slurm_spank_task_init (the job's user; stdio and environment now final):
 * hand both to the keeper, then only forward signals, wait for it and exit
 * with its code.
 */
void transparent_task_init(spank_t sp)
{
	char **env;
	int fds[4], status;
	char data = 'x';
	char cbuf[CMSG_SPACE(sizeof(fds))];
	struct iovec iov = { .iov_base = &data, .iov_len = 1 };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	const int sigs[] = { SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2, SIGQUIT };

	if (keeper_pid <= 0)
		return;
	if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS
	    || (fds[3] = env_memfd(env)) < 0) {
		slurm_error("singularity: --transparent: cannot pass the job's environment");
		kill(keeper_pid, SIGKILL);
		_exit(1);
	}
	fds[0] = 0;
	fds[1] = 1;
	fds[2] = 2;
	memset(cbuf, 0, sizeof(cbuf));
	cm = CMSG_FIRSTHDR(&msg);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(fds));
	memcpy(CMSG_DATA(cm), fds, sizeof(fds));
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = forward_signal;
	sigemptyset(&sa.sa_mask);
	for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
		sigaction(sigs[i], &sa, NULL);
	if (sendmsg(keeper_sock, &msg, 0) != 1) {
		slurm_error("singularity: --transparent: cannot hand the task to the keeper: %m");
		kill(keeper_pid, SIGKILL);
		_exit(1);
	}
	close(fds[3]);
	while (waitpid(keeper_pid, &status, 0) < 0)
		if (errno != EINTR)
			_exit(1);
	_exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
}
