/*
 * Local context (srun). Like the allocator context: syntax is checked by the
 * option callbacks, the policy by job_submit.lua (for a new allocation) or
 * not at all (a step inside an existing job keeps the job's policy values).
 */
#include "contexts.h"
#include "options.h"

int local_init_post_opt(spank_t sp)
{
	(void)sp;
	singularity_options_log();
	return 0;
}
