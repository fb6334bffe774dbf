// The same 24 products with a tile that reads the weights in place (dot
// products along K: 3 rows of x by 4 rows of W, eight lanes, reduced at the
// end), no packing; argument: KiB of x per block.
//   gcc -O3 -mavx2 -mfma dot_tile_micro.c -o dot_tile_micro && ./dot_tile_micro 64
// benchmarks/README.md, "Own float32 GEMM against MKL (AMD EPYC, AVX2)".
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static inline __m128 red4(__m256 a0,__m256 a1,__m256 a2,__m256 a3){
  __m256 h=_mm256_hadd_ps(_mm256_hadd_ps(a0,a1),_mm256_hadd_ps(a2,a3));
  return _mm_add_ps(_mm256_castps256_ps128(h),_mm256_extractf128_ps(h,1));
}
// 3 x rows x 4 w rows
static inline void tile34(int K,const float*x,int ldx,const float*w,int ldw,float*c,int ldc){
  __m256 a00=_mm256_setzero_ps(),a01=a00,a02=a00,a03=a00,a10=a00,a11=a00,a12=a00,a13=a00,a20=a00,a21=a00,a22=a00,a23=a00;
  const float*x0=x,*x1=x+ldx,*x2=x+2*ldx,*w0=w,*w1=w+ldw,*w2=w+2*ldw,*w3=w+3*ldw;
  for(int k=0;k<K;k+=8){
    __m256 v0=_mm256_loadu_ps(x0+k),v1=_mm256_loadu_ps(x1+k),v2=_mm256_loadu_ps(x2+k),b;
    b=_mm256_loadu_ps(w0+k);a00=_mm256_fmadd_ps(v0,b,a00);a10=_mm256_fmadd_ps(v1,b,a10);a20=_mm256_fmadd_ps(v2,b,a20);
    b=_mm256_loadu_ps(w1+k);a01=_mm256_fmadd_ps(v0,b,a01);a11=_mm256_fmadd_ps(v1,b,a11);a21=_mm256_fmadd_ps(v2,b,a21);
    b=_mm256_loadu_ps(w2+k);a02=_mm256_fmadd_ps(v0,b,a02);a12=_mm256_fmadd_ps(v1,b,a12);a22=_mm256_fmadd_ps(v2,b,a22);
    b=_mm256_loadu_ps(w3+k);a03=_mm256_fmadd_ps(v0,b,a03);a13=_mm256_fmadd_ps(v1,b,a13);a23=_mm256_fmadd_ps(v2,b,a23);
  }
  _mm_storeu_ps(c,red4(a00,a01,a02,a03));_mm_storeu_ps(c+ldc,red4(a10,a11,a12,a13));_mm_storeu_ps(c+2*ldc,red4(a20,a21,a22,a23));
}
static inline void tile14(int K,const float*x,const float*w,int ldw,float*c){
  __m256 a0=_mm256_setzero_ps(),a1=a0,a2=a0,a3=a0;
  const float*w0=w,*w1=w+ldw,*w2=w+2*ldw,*w3=w+3*ldw;
  for(int k=0;k<K;k+=8){
    __m256 v=_mm256_loadu_ps(x+k);
    a0=_mm256_fmadd_ps(v,_mm256_loadu_ps(w0+k),a0);a1=_mm256_fmadd_ps(v,_mm256_loadu_ps(w1+k),a1);
    a2=_mm256_fmadd_ps(v,_mm256_loadu_ps(w2+k),a2);a3=_mm256_fmadd_ps(v,_mm256_loadu_ps(w3+k),a3);
  }
  _mm_storeu_ps(c,red4(a0,a1,a2,a3));
}
static void gemm(int M,int K,int N,const float*x,const float*W,float*C,int MC){
  for(int i0=0;i0<M;i0+=MC){
    int mc=M-i0<MC?M-i0:MC;
    for(int n=0;n<N;n+=4){
      int i=0;
      for(;i+3<=mc;i+=3) tile34(K,x+(size_t)(i0+i)*K,K,W+(size_t)n*K,K,C+(size_t)(i0+i)*N+n,N);
      for(;i<mc;i++) tile14(K,x+(size_t)(i0+i)*K,W+(size_t)n*K,K,C+(size_t)(i0+i)*N+n);
    }
  }
}
int main(int argc,char**argv){
  int MCK=atoi(argv[1]); // bytes of x block in KiB
  int shapes[4][2]={{1152,384},{384,384},{1536,384},{384,1536}};
  int L=6;
  float*W[6][4];
  for(int l=0;l<L;l++)for(int s=0;s<4;s++){int n=shapes[s][0],k=shapes[s][1];W[l][s]=aligned_alloc(64,(size_t)n*k*4);for(size_t i=0;i<(size_t)n*k;i++)W[l][s][i]=rand()/(float)RAND_MAX-.5f;}
  int Ms[]={1,4,16,40,128,2048};
  for(int mi=0;mi<6;mi++){
    int M=Ms[mi];
    float*x=aligned_alloc(64,(size_t)M*1536*4),*C=aligned_alloc(64,(size_t)M*1536*4);
    for(size_t i=0;i<(size_t)M*1536;i++)x[i]=rand()/(float)RAND_MAX-.5f;
    double best=1e9;
    for(int r=0;r<(M>=2048?3:10);r++){double t=now();
      for(int l=0;l<L;l++)for(int s=0;s<4;s++){int n=shapes[s][0],k=shapes[s][1];int MC=(MCK*1024)/(k*4);if(MC<3)MC=3;MC=MC/3*3;gemm(M,k,n,x,W[l][s],C,MC);}
      t=now()-t;if(t<best)best=t;}
    double fl=2.0*M*(1152*384+384*384+1536*384+384*1536)*L;
    // check one
    int n=384,k=1536; gemm(M,k,n,x,W[0][3],C,M); double err=0; for(int t=0;t<20;t++){int i=rand()%M,j=rand()%n;double s=0;for(int q=0;q<k;q++)s+=(double)x[(size_t)i*k+q]*W[0][3][(size_t)j*k+q];double e=s-C[(size_t)i*n+j];if(e<0)e=-e;if(e>err)err=e;}
    printf("M=%d: 24 products %.2f ms, %.1f GFLOP/s err %.1e\n",M,best*1e3,fl/best/1e9,err);
  }
}
