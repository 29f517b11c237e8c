/*
 * One function per (entry point, context) pair; singularity.c dispatches.
 * Each returns 0 on success, -1 after logging a "singularity: " message.
 */
#ifndef SINGULARITY_CONTEXTS_H
#define SINGULARITY_CONTEXTS_H

#include <slurm/spank.h>

/* sbatch / salloc */
int allocator_init(spank_t sp);
int allocator_init_post_opt(spank_t sp);

/* srun */
int local_init_post_opt(spank_t sp);

/* slurmstepd */
int remote_user_init(spank_t sp);
int remote_task_init(spank_t sp);
int transparent_task_privileged(spank_t sp);
void transparent_task_init(spank_t sp);
int remote_exit(spank_t sp);

#endif
