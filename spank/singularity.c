/*
 * singularity SPANK plugin: the entry points Slurm looks up, and nothing
 * else. Each switches on spank_context() into the file of that context:
 * allocator.c (sbatch, salloc), local.c (srun), remote.c (slurmstepd,
 * which starts the step's device proxies through proxies.c).
 * Options are registered from one table (options.c) in slurm_spank_init:
 * sbatch and salloc of Slurm 22.05 show and accept only options registered
 * there, not a static spank_options table.
 */
#include <slurm/spank.h>

#include "contexts.h"
#include "options.h"
#include "proxies.h"

SPANK_PLUGIN(singularity, 1)

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	switch (spank_context()) {
	case S_CTX_REMOTE:
		if (proxies_configure(ac, av) != 0)
			return ESPANK_ERROR;
		return singularity_options_register(sp) == 0 ? ESPANK_SUCCESS : ESPANK_ERROR;
	case S_CTX_ALLOCATOR:
		if (allocator_init(sp) != 0)
			return ESPANK_ERROR;
		return singularity_options_register(sp) == 0 ? ESPANK_SUCCESS : ESPANK_ERROR;
	case S_CTX_LOCAL:
		return singularity_options_register(sp) == 0 ? ESPANK_SUCCESS : ESPANK_ERROR;
	default:
		return ESPANK_SUCCESS;
	}
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	switch (spank_context()) {
	case S_CTX_ALLOCATOR:
		return allocator_init_post_opt(sp) == 0 ? ESPANK_SUCCESS : ESPANK_ERROR;
	case S_CTX_LOCAL:
		return local_init_post_opt(sp) == 0 ? ESPANK_SUCCESS : ESPANK_ERROR;
	default:
		return ESPANK_SUCCESS;
	}
}

int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	if (spank_context() != S_CTX_REMOTE)
		return ESPANK_SUCCESS;
	return remote_user_init(sp) == 0 ? ESPANK_SUCCESS : ESPANK_ERROR;
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	if (spank_context() != S_CTX_REMOTE)
		return ESPANK_SUCCESS;
	return transparent_task_privileged(sp) == 0 ? ESPANK_SUCCESS : ESPANK_ERROR;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	if (spank_context() != S_CTX_REMOTE)
		return ESPANK_SUCCESS;
	return remote_task_init(sp) == 0 ? ESPANK_SUCCESS : ESPANK_ERROR;
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	int rc = 0;

	(void)ac;
	(void)av;
	if (spank_context() == S_CTX_REMOTE)
		rc = remote_exit(sp);
	singularity_options_clear();
	return rc == 0 ? ESPANK_SUCCESS : ESPANK_ERROR;
}
