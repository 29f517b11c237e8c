/*
 * Options of the singularity SPANK plugin: one table, one parser per option.
 *
 * The syntax checks here are the same as slurm_singularity/policy/rules.py
 * (parse_*) and the generated job_submit.lua, with the same messages, so a
 * typo fails at once in sbatch/salloc/srun; the policy checks (which tier an
 * account may use, world size against device counts) are job_submit.lua's.
 */
#ifndef SINGULARITY_OPTIONS_H
#define SINGULARITY_OPTIONS_H

#include <stddef.h>

#include <slurm/spank.h>

/* Largest --world-size and --elastic bound (rules.MAX_COUNT). */
#define SINGULARITY_MAX_COUNT 65536

enum singularity_option_id {
	OPT_SLA = 1,
	OPT_ELASTIC,
	OPT_WORLD_SIZE,
	OPT_CKPT_DIR,
	OPT_PROXY,
	OPT_DETERMINISTIC,
	OPT_TRANSPARENT,
	OPT_CKPT_EVERY,
	OPT_COUNT /* number of options + 1 */
};

/*
 * Values of the options as the user gave them (NULL = not given). Set by the
 * option callbacks; a callback called twice (a command line option after an
 * #SBATCH line, or the remote context re-reading the options) replaces the
 * value, so the callbacks are idempotent.
 */
struct singularity_options {
	char *value[OPT_COUNT];
};

extern struct singularity_options singularity_opts;

/* Job environment variable each option sets (contract.py), by option id. */
const char *singularity_option_env(int id);

/* Long option name ("sla", "world-size") by option id. */
const char *singularity_option_name(int id);

/* Register every option of the table with spank_option_register. */
int singularity_options_register(spank_t sp);

/* Log the given options at debug level. */
void singularity_options_log(void);

/* Forget the stored values (slurm_spank_exit). */
void singularity_options_clear(void);

/*
 * Check the syntax of an option value. Returns 0 if valid; otherwise -1 and
 * writes a message (without the "singularity: " prefix) into msg.
 */
int singularity_option_check(int id, const char *value, char *msg, size_t len);

#endif
