#!/bin/bash

# Parameters
#SBATCH --account='lab "x" $(echo injected)'
#SBATCH --comment='`echo injected`'
#SBATCH --cpus-per-task=10
#SBATCH --error='/runs/it'"'"'s a "run"; echo injected/logs/%j_0_log.err'
#SBATCH --gpus-per-node=4
#SBATCH --job-name=golden
#SBATCH --mail-type=END,FAIL
#SBATCH --mem=65536M
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output='/runs/it'"'"'s a "run"; echo injected/logs/%j_0_log.out'
#SBATCH --partition='gpu'"'"'; echo injected'
#SBATCH --qos=high
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=120
#SBATCH --wckey=submitit

# setup
module load cuda/12.1
source '/opt/my env/bin/activate'

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output '/runs/it'"'"'s a "run"; echo injected/logs/%j_%t_log.out' --error '/runs/it'"'"'s a "run"; echo injected/logs/%j_%t_log.err' '/opt/my env/bin/python' -u -m submitit.core._submit '/runs/it'"'"'s a "run"; echo injected/logs'
