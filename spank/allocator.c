/*
 * Allocator context (sbatch, salloc). The option callbacks have already
 * checked each option's syntax; Slurm passes the values on to job_submit.lua
 * (job_desc.spank_job_env) and to the job's steps. What the policy allows is
 * job_submit.lua's decision, so nothing more is checked here.
 *
 * Output files are opened in append mode by default: a Singularity job is
 * requeued at every preemption and resize, and Slurm's default (truncate,
 * unless slurm.conf has JobFileAppend=1) would erase the log of every earlier
 * run. job_submit.lua of Slurm 22.05 can neither read nor set open_mode, so
 * the default is sbatch's own input variable SBATCH_OPEN_MODE, set in
 * slurm_spank_init, which sbatch runs before it reads its options. sbatch
 * ranks it as it ranks every input variable: above #SBATCH lines, below the
 * command line; a SBATCH_OPEN_MODE the user set is kept.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "contexts.h"
#include "options.h"

int allocator_init(spank_t sp)
{
	(void)sp;
	if (setenv("SBATCH_OPEN_MODE", "append", 0) != 0) {
		slurm_error("singularity: cannot set SBATCH_OPEN_MODE=append: %s",
			    strerror(errno));
		return -1;
	}
	return 0;
}

int allocator_init_post_opt(spank_t sp)
{
	(void)sp;
	singularity_options_log();
	return 0;
}
