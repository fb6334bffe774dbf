// A standalone 6 x 16 AVX2 + FMA register tile (BLIS's Haswell blocking) on
// packed weights, one thread, four blockings (rows per packed block MC, K
// block KC; MC 0: a block of about 192 KiB) alternating over six rounds.
//   gcc -O3 -mavx2 -mfma blis_tile_micro.c -o blis_tile_micro && ./blis_tile_micro
// benchmarks/README.md, "Own float32 GEMM against MKL (AMD EPYC, AVX2)".
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define MR 6
#define NR 16
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
// B: K x N row-major -> packed panels: for jp in N/NR: for k: 16 floats
static int KC=256;
static void packB(const float*B,int K,int N,float*Bp){
  for(int k0=0;k0<K;k0+=KC){int kc=K-k0<KC?K-k0:KC;
  for(int j=0;j<N;j+=NR) for(int k=0;k<kc;k++) memcpy(Bp+(size_t)k0*N+(size_t)j*kc+(size_t)k*NR,B+(size_t)(k0+k)*N+j,NR*4);}
}
static inline void kern(int K,const float*Ap,const float*Bp,float*C,int ldc,int acc){
  __m256 c00=_mm256_setzero_ps(),c01=c00,c10=c00,c11=c00,c20=c00,c21=c00,c30=c00,c31=c00,c40=c00,c41=c00,c50=c00,c51=c00;
  if(acc){c00=_mm256_loadu_ps(C);c01=_mm256_loadu_ps(C+8);c10=_mm256_loadu_ps(C+ldc);c11=_mm256_loadu_ps(C+ldc+8);c20=_mm256_loadu_ps(C+2*ldc);c21=_mm256_loadu_ps(C+2*ldc+8);c30=_mm256_loadu_ps(C+3*ldc);c31=_mm256_loadu_ps(C+3*ldc+8);c40=_mm256_loadu_ps(C+4*ldc);c41=_mm256_loadu_ps(C+4*ldc+8);c50=_mm256_loadu_ps(C+5*ldc);c51=_mm256_loadu_ps(C+5*ldc+8);}
  for(int k=0;k<K;k++){
    __m256 b0=_mm256_load_ps(Bp),b1=_mm256_load_ps(Bp+8); __m256 a;
    a=_mm256_broadcast_ss(Ap+0);c00=_mm256_fmadd_ps(a,b0,c00);c01=_mm256_fmadd_ps(a,b1,c01);
    a=_mm256_broadcast_ss(Ap+1);c10=_mm256_fmadd_ps(a,b0,c10);c11=_mm256_fmadd_ps(a,b1,c11);
    a=_mm256_broadcast_ss(Ap+2);c20=_mm256_fmadd_ps(a,b0,c20);c21=_mm256_fmadd_ps(a,b1,c21);
    a=_mm256_broadcast_ss(Ap+3);c30=_mm256_fmadd_ps(a,b0,c30);c31=_mm256_fmadd_ps(a,b1,c31);
    a=_mm256_broadcast_ss(Ap+4);c40=_mm256_fmadd_ps(a,b0,c40);c41=_mm256_fmadd_ps(a,b1,c41);
    a=_mm256_broadcast_ss(Ap+5);c50=_mm256_fmadd_ps(a,b0,c50);c51=_mm256_fmadd_ps(a,b1,c51);
    Ap+=MR;Bp+=NR;
  }
  _mm256_storeu_ps(C+0*ldc,c00);_mm256_storeu_ps(C+0*ldc+8,c01);
  _mm256_storeu_ps(C+1*ldc,c10);_mm256_storeu_ps(C+1*ldc+8,c11);
  _mm256_storeu_ps(C+2*ldc,c20);_mm256_storeu_ps(C+2*ldc+8,c21);
  _mm256_storeu_ps(C+3*ldc,c30);_mm256_storeu_ps(C+3*ldc+8,c31);
  _mm256_storeu_ps(C+4*ldc,c40);_mm256_storeu_ps(C+4*ldc+8,c41);
  _mm256_storeu_ps(C+5*ldc,c50);_mm256_storeu_ps(C+5*ldc+8,c51);
}
// C = A(MxK) * B(KxN); M multiple of MR*? assume M%MR==0 here
static void gemm(int M,int K,int N,const float*A,const float*Bp,float*C,float*Ap,int MC){
  for(int i0=0;i0<M;i0+=MC){
    int mc=M-i0<MC?M-i0:MC;
    for(int k0=0;k0<K;k0+=KC){int kc=K-k0<KC?K-k0:KC;
    for(int i=0;i<mc;i+=MR) for(int k=0;k<kc;k++) for(int r=0;r<MR;r++) Ap[(size_t)i*kc+k*MR+r]=A[(size_t)(i0+i+r)*K+k0+k];
    for(int j=0;j<N;j+=NR)
      for(int i=0;i<mc;i+=MR) kern(kc,Ap+(size_t)i*kc,Bp+(size_t)k0*N+(size_t)j*kc,C+(size_t)(i0+i)*N+j,N,k0>0);}
  }
}

int main(int argc,char**argv){
  int shapes[][3]={{2046,1536,384},{2046,384,1536},{2046,384,1152},{2046,384,384},{2046,3072,768}};
  int variants[][2]={{96,100000},{0,100000},{96,384},{48,100000}};
  for(int s=0;s<5;s++){
    int M=shapes[s][0],K=shapes[s][1],N=shapes[s][2];
    float*A=aligned_alloc(64,(size_t)M*K*4),*B=aligned_alloc(64,(size_t)K*N*4),*C=aligned_alloc(64,(size_t)M*N*4),*Ap=aligned_alloc(64,(size_t)(2048+MR)*K*4);
    for(size_t i=0;i<(size_t)M*K;i++)A[i]=rand()/(float)RAND_MAX-.5f;
    for(size_t i=0;i<(size_t)K*N;i++)B[i]=rand()/(float)RAND_MAX-.5f;
    double best[4]={1e9,1e9,1e9,1e9};
    float*Bps[4];
    for(int v=0;v<4;v++){KC=variants[v][1];Bps[v]=aligned_alloc(64,(size_t)K*N*4);packB(B,K,N,Bps[v]);}
    for(int r=0;r<6;r++) for(int v=0;v<4;v++){
      int MC=variants[v][0]; KC=variants[v][1];
      int kc=K<KC?K:KC; if(MC==0){MC=(196608/(kc*4))/6*6; if(MC<12)MC=12;}
      double t=now();gemm(M,K,N,A,Bps[v],C,Ap,MC);t=now()-t;if(t<best[v])best[v]=t;}
    printf("%d %d %d:",M,K,N); for(int v=0;v<4;v++) printf(" [MC %d KC %d] %.1f",variants[v][0],variants[v][1],2.0*M*K*N/best[v]/1e9); printf("\n");
  }
}
