/*
 * The option table and its syntax checks (see options.h for why they mirror
 * rules.py).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "options.h"

struct singularity_options singularity_opts;

static int option_cb(int val, const char *optarg, int remote);

/* One table: spank_option_register needs writable structs, so no const. */
static struct spank_option option_table[] = {
	{ "sla", "premium|standard|basic",
	  "Singularity SLA tier of the job (default: the policy's default tier).",
	  1, OPT_SLA, option_cb },
	{ "elastic", "MIN:MAX",
	  "Devices the job accepts; Singularity grows and shrinks it within "
	  "MIN..MAX (default: not elastic, MIN=MAX=GPUs requested).",
	  1, OPT_ELASTIC, option_cb },
	{ "world-size", "N",
	  "Logical data-parallel ranks, fixed for the job's life; a multiple "
	  "of every device count it may run on (default: GPUs requested, or "
	  "the least common multiple of MIN, MAX and it when elastic).",
	  1, OPT_WORLD_SIZE, option_cb },
	{ "ckpt-dir", "DIR",
	  "Absolute directory for the job's checkpoints (default: chosen by "
	  "the runtime from the job id).",
	  1, OPT_CKPT_DIR, option_cb },
	{ "proxy", "on|off",
	  "Run device work through one device proxy per GPU (default: off).",
	  1, OPT_PROXY, option_cb },
	{ "deterministic", "on|off",
	  "Reduce in one fixed order so results are bitwise equal on any "
	  "number of devices (default: on).",
	  1, OPT_DETERMINISTIC, option_cb },
	{ "transparent", NULL,
	  "Checkpoint the unmodified job's whole process tree with CRIU at "
	  "preemption and restore it when the job starts again (single node; "
	  "no srun steps).",
	  0, OPT_TRANSPARENT, option_cb },
	{ "ckpt-every", "SECONDS",
	  "With --transparent: also dump the process tree every SECONDS "
	  "(1..2592000), so a node failure costs at most one interval.",
	  1, OPT_CKPT_EVERY, option_cb },
	SPANK_OPTIONS_TABLE_END
};

static const char *const option_env[OPT_COUNT] = {
	[OPT_SLA] = "SINGULARITY_SLA",
	[OPT_ELASTIC] = "SINGULARITY_ELASTIC",
	[OPT_WORLD_SIZE] = "SINGULARITY_WORLD_SIZE",
	[OPT_CKPT_DIR] = "SINGULARITY_CKPT_DIR",
	[OPT_PROXY] = "SINGULARITY_PROXY",
	[OPT_DETERMINISTIC] = "SINGULARITY_DETERMINISTIC",
	[OPT_TRANSPARENT] = "SINGULARITY_TRANSPARENT",
	[OPT_CKPT_EVERY] = "SINGULARITY_CKPT_EVERY_S",
};

const char *singularity_option_env(int id)
{
	return (id > 0 && id < OPT_COUNT) ? option_env[id] : NULL;
}

const char *singularity_option_name(int id)
{
	for (struct spank_option *o = option_table; o->name != NULL; o++)
		if (o->val == id)
			return o->name;
	return "?";
}

int singularity_options_register(spank_t sp)
{
	for (struct spank_option *o = option_table; o->name != NULL; o++) {
		spank_err_t rc = spank_option_register(sp, o);
		if (rc != ESPANK_SUCCESS) {
			slurm_error("singularity: cannot register option --%s: %s",
				    o->name, spank_strerror(rc));
			return -1;
		}
	}
	return 0;
}

void singularity_options_log(void)
{
	for (int id = 1; id < OPT_COUNT; id++)
		if (singularity_opts.value[id] != NULL)
			slurm_debug("singularity: --%s=%s", singularity_option_name(id),
				    singularity_opts.value[id]);
}

void singularity_options_clear(void)
{
	for (int i = 0; i < OPT_COUNT; i++) {
		free(singularity_opts.value[i]);
		singularity_opts.value[i] = NULL;
	}
}

/* A whole number of 1..6 ASCII digits in [s, end); -1 if not. */
static long parse_count(const char *s, const char *end)
{
	long n = 0;
	if (end <= s || end - s > 6)
		return -1;
	for (const char *p = s; p < end; p++) {
		if (*p < '0' || *p > '9')
			return -1;
		n = n * 10 + (*p - '0');
	}
	return n;
}

static int check_elastic(const char *v, char *msg, size_t len)
{
	const char *colon = strchr(v, ':');
	long lo, hi;

	if (colon == NULL
	    || (lo = parse_count(v, colon)) < 0
	    || (hi = parse_count(colon + 1, v + strlen(v))) < 0) {
		snprintf(msg, len, "--elastic=%s: expected MIN:MAX devices, "
			 "two whole numbers such as 2:8", v);
		return -1;
	}
	if (lo < 1 || hi > SINGULARITY_MAX_COUNT) {
		snprintf(msg, len, "--elastic=%s: MIN and MAX must lie in 1..%d",
			 v, SINGULARITY_MAX_COUNT);
		return -1;
	}
	if (lo > hi) {
		snprintf(msg, len, "--elastic=%s: MIN must not exceed MAX", v);
		return -1;
	}
	return 0;
}

int singularity_option_check(int id, const char *v, char *msg, size_t len)
{
	long n;

	if (v == NULL && id == OPT_TRANSPARENT)
		return 0;
	if (v == NULL) {
		snprintf(msg, len, "--%s needs a value", singularity_option_name(id));
		return -1;
	}
	switch (id) {
	case OPT_SLA:
		if (strcmp(v, "premium") && strcmp(v, "standard") && strcmp(v, "basic")) {
			snprintf(msg, len, "--sla=%s: unknown tier "
				 "(expected premium, standard or basic)", v);
			return -1;
		}
		return 0;
	case OPT_ELASTIC:
		return check_elastic(v, msg, len);
	case OPT_WORLD_SIZE:
		n = parse_count(v, v + strlen(v));
		if (n < 1 || n > SINGULARITY_MAX_COUNT) {
			snprintf(msg, len, "--world-size=%s: expected a whole number in 1..%d",
				 v, SINGULARITY_MAX_COUNT);
			return -1;
		}
		return 0;
	case OPT_CKPT_DIR:
		if (v[0] != '/' || strpbrk(v, ",\n") != NULL) {
			snprintf(msg, len, "--ckpt-dir=%s: expected an absolute path "
				 "without commas", v);
			return -1;
		}
		return 0;
	case OPT_PROXY:
	case OPT_DETERMINISTIC:
		if (strcmp(v, "on") && strcmp(v, "off")) {
			snprintf(msg, len, "--%s=%s: expected on or off",
				 singularity_option_name(id), v);
			return -1;
		}
		return 0;
	case OPT_TRANSPARENT:
		return 0;
	case OPT_CKPT_EVERY:
		n = parse_count(v, v + strlen(v));
		if (n < 1 || n > 2592000) {
			snprintf(msg, len, "--ckpt-every=%s: expected whole seconds in 1..2592000", v);
			return -1;
		}
		return 0;
	default:
		snprintf(msg, len, "unknown option id %d", id);
		return -1;
	}
}

static int option_cb(int val, const char *optarg, int remote)
{
	char msg[512];
	char *copy;

	(void)remote;
	if (singularity_option_check(val, optarg, msg, sizeof(msg)) != 0) {
		slurm_error("singularity: %s", msg);
		return -1;
	}
	copy = strdup(optarg != NULL ? optarg : "on");
	if (copy == NULL) {
		slurm_error("singularity: --%s: out of memory", singularity_option_name(val));
		return -1;
	}
	free(singularity_opts.value[val]);
	singularity_opts.value[val] = copy;
	return 0;
}
