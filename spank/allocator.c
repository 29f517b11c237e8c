/*
 * Allocator context (sbatch, salloc). The option callbacks have already
 * checked each option's syntax; Slurm passes the values on to job_submit.lua
 * (job_desc.spank_job_env) and to the job's steps. What the policy allows is
 * job_submit.lua's decision, so nothing more is checked here.
 */
#include "contexts.h"
#include "options.h"

int allocator_init_post_opt(spank_t sp)
{
	(void)sp;
	singularity_options_log();
	return 0;
}
