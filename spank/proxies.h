/*
 * The device proxies of a job step (remote context); see proxies.c.
 */
#ifndef SINGULARITY_PROXIES_H
#define SINGULARITY_PROXIES_H

#include <slurm/spank.h>

/* Read the plugin's plugstack.conf arguments (python=PATH). 0 or -1. */
int proxies_configure(int ac, char **av);

/* slurm_spank_user_init: start the step's proxies when --proxy=on and put
 * their addresses into the step's environment. 0, or -1 (logged). */
int proxies_start(spank_t sp);

/* slurm_spank_task_init, in the task's process: when proxies_start failed,
 * log why and end the process (exit code 1), so that no task runs without
 * its proxies. */
void proxies_check_task(void);

/* python=PATH of plugstack.conf ("" when not given). */
const char *proxies_python(void);

/* slurm_spank_exit: stop the proxies proxies_start started, if any. */
int proxies_stop(void);

#endif
