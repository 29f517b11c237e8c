/*
 * Remote context (slurmstepd): put the options into the job step's
 * environment as the SINGULARITY_* variables of slurm_singularity/contract.py,
 * so the runtime reads the same values that job_submit.lua and the scheduler
 * daemon saw. An option that was not given leaves the variable as it is:
 * for a batch job job_submit.lua has set the policy's default there.
 * Then, with --proxy=on, start the step's device proxies (proxies.c) before
 * the tasks, and stop them when the step ends.
 */
#include <string.h>

#include "contexts.h"
#include "options.h"
#include "proxies.h"

int remote_user_init(spank_t sp)
{
	for (int id = 1; id < OPT_COUNT; id++) {
		const char *value = singularity_opts.value[id];
		const char *name = singularity_option_env(id);
		spank_err_t rc;

		if (value == NULL || name == NULL)
			continue;
		rc = spank_setenv(sp, name, value, 1);
		if (rc != ESPANK_SUCCESS) {
			slurm_error("singularity: cannot set %s=%s in the job environment: %s",
				    name, value, spank_strerror(rc));
			return -1;
		}
	}
	return proxies_start(sp);
}

int remote_task_init(spank_t sp)
{
	proxies_check_task();
	transparent_task_init(sp);
	return 0;
}

int remote_exit(spank_t sp)
{
	(void)sp;
	return proxies_stop();
}
